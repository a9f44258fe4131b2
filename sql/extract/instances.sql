-- Every instance with its org and tier; small next to heartbeats.
SELECT instance_id, org_id, tier, status, stopped_at
FROM instances
