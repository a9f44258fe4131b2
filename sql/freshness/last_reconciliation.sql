-- The newest real reconciliation: when it ended, its run and how long that run took.
SELECT reconciled_at, run_id,
       EXTRACT(EPOCH FROM reconciled_at - run_started_at)::float8 AS duration_seconds
FROM billing.reconciliations
ORDER BY reconciled_at DESC
LIMIT 1
