-- Control plane: every instance of one org (the daily cap is per org).
SELECT instance_id, org_id, tier, status, stopped_at
FROM instances
WHERE org_id = %(org_id)s
ORDER BY instance_id
