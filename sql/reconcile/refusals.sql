SELECT org_id, tier, provider, seconds, reason
FROM billing.push_refusals
WHERE usage_date = %(usage_date)s
