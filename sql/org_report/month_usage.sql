-- One org's billable seconds in one month, per day and tier.
SELECT org_id, usage_date, tier, billable_seconds
FROM billing.billed_usage
WHERE org_id = %(org_id)s
  AND usage_date >= %(month_start)s AND usage_date < %(next_month)s
  AND billable_seconds > 0
ORDER BY usage_date, tier
