-- One org's metered seconds per day and tier in one month (tally org --days).
SELECT usage_date, tier, runtime_seconds, idle_paused_seconds, over_continuous_seconds,
       over_daily_seconds, billable_seconds
FROM billing.billed_usage
WHERE org_id = %(org_id)s
  AND usage_date >= %(month_start)s AND usage_date < %(next_month)s
ORDER BY usage_date, tier
