SELECT org_id, tier, provider, customer_id, seconds, exact
FROM billing.provider_usage
WHERE usage_date = %(usage_date)s
