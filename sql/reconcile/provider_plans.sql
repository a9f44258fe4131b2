SELECT org_id, provider, customer_id, plan, status, read_at
FROM billing.provider_plans
WHERE usage_date = %(usage_date)s
