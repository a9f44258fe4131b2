-- Announcements a channel failed to take, still worth retrying.
SELECT alert_id, kind, job_name, partition_key, run_id, run_ended_at, resolves_run_id,
       step_key, error, channels
FROM billing.run_failure_alerts
WHERE status = 'failed' AND attempts < %(max_attempts)s
ORDER BY alert_id
