-- The last announcement per (job, day) among the given keys.
SELECT DISTINCT ON (a.job_name, a.partition_key)
       a.job_name, a.partition_key, a.kind, a.run_id, a.run_ended_at
FROM billing.run_failure_alerts AS a
JOIN unnest(%(job_names)s::text[], %(partition_keys)s::text[]) AS k (job_name, partition_key)
  ON k.job_name = a.job_name AND k.partition_key = a.partition_key
ORDER BY a.job_name, a.partition_key, a.run_ended_at DESC, a.alert_id DESC
