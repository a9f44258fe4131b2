-- Control plane: one instance of one org (tally org --instance).
SELECT instance_id, org_id, tier, status, stopped_at
FROM instances
WHERE instance_id = %(instance_id)s AND org_id = %(org_id)s
