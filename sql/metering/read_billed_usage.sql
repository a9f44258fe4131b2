SELECT org_id, usage_date, tier, runtime_seconds, idle_paused_seconds,
       over_continuous_seconds, over_daily_seconds, billable_seconds
FROM billing.billed_usage
WHERE usage_date = %(usage_date)s AND part = %(part)s
ORDER BY org_id, tier
