-- Billable seconds of one month up to and including the partition day.
SELECT org_id, usage_date, tier, billable_seconds
FROM billing.billed_usage
WHERE usage_date >= %(month_start)s AND usage_date <= %(usage_date)s AND billable_seconds > 0
ORDER BY org_id, usage_date, tier
