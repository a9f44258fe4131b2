INSERT INTO billing.run_failure_alerts
  (kind, job_name, partition_key, run_id, run_ended_at, resolves_run_id, step_key, error,
   dedup_key, status, created_at, updated_at)
VALUES
  (%(kind)s, %(job_name)s, %(partition_key)s, %(run_id)s, %(run_ended_at)s,
   %(resolves_run_id)s, %(step_key)s, %(error)s, %(dedup_key)s, 'pending', %(now)s, %(now)s)
ON CONFLICT (run_id, kind) DO NOTHING
RETURNING alert_id
