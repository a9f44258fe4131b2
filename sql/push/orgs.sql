SELECT org_id, provider, provider_customer_id FROM organizations
