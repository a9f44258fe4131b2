-- Control plane: one organization (tally org).
SELECT org_id, name, billing_email, plan, provider, provider_customer_id, created_at
FROM organizations
WHERE org_id = %(org_id)s
