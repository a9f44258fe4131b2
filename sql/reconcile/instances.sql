-- Instances for the stuck / zombie checks (control plane).
SELECT instance_id, org_id, tier, status, created_at, stopped_at, last_heartbeat
FROM instances
