SELECT org_id, tier, runtime_seconds, billable_seconds
FROM billing.billed_usage
WHERE usage_date = %(usage_date)s
