-- The control plane's organizations: names beside ids, plans for the invoice.
SELECT org_id, name, plan, created_at
FROM organizations
ORDER BY org_id
