-- The demo's closed invoice: the second Stripe org with a customer (the first takes
-- the simulated double charge).
SELECT org_id, provider_customer_id
FROM organizations
WHERE provider = 'stripe' AND coalesce(provider_customer_id, '') <> ''
ORDER BY org_id
OFFSET 1
LIMIT 1
