-- Every seeded org's provider customer, created in the demo's sandbox before the
-- first push (Stripe counts usage only for customers that exist).
SELECT provider, provider_customer_id AS customer, name, billing_email AS email
FROM organizations
WHERE coalesce(provider_customer_id, '') <> ''
ORDER BY org_id
