-- The demo's simulated double charge lands on the first Stripe org with a customer.
SELECT org_id, provider_customer_id
FROM organizations
WHERE provider = 'stripe' AND coalesce(provider_customer_id, '') <> ''
ORDER BY org_id
LIMIT 1
