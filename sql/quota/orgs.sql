-- Control plane: every org with its plan (read on the control-plane database).
SELECT org_id, name, billing_email, plan, created_at
FROM organizations
ORDER BY org_id
