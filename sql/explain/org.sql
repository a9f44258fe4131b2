-- Does the org exist in the control plane?
SELECT name FROM organizations WHERE org_id = %(org_id)s
