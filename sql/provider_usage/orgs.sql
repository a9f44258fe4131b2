-- Every org with its provider and customer id (control plane).
SELECT org_id, provider, provider_customer_id
FROM organizations
ORDER BY org_id
