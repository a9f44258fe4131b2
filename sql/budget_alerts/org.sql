-- Control plane: one organization's name and billing address (tally alerts test).
SELECT org_id, name, billing_email
FROM organizations
WHERE org_id = %(org_id)s
