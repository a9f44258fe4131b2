-- Billable seconds per (org, day, tier) of a span of usage days (the month to date).
SELECT org_id, usage_date, tier, billable_seconds
FROM billing.billed_usage
WHERE usage_date BETWEEN %(start_date)s AND %(end_date)s
ORDER BY org_id, usage_date, tier
