-- Billable seconds per (org, tier) for the day: what the provider should hold.
SELECT org_id, tier, billable_seconds
FROM billing.billed_usage
WHERE usage_date = %(usage_date)s
ORDER BY org_id, tier
