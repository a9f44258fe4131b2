-- Billable seconds per (org, tier) for the day: what the provider should hold.
SELECT org_id, tier, billable_seconds
FROM billing.billed_usage
WHERE usage_date = %(usage_date)s AND part = %(part)s
ORDER BY org_id, tier
