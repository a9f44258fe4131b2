-- A real reconciliation of the day succeeded (inside its discrepancies' transaction).
INSERT INTO billing.reconciliations (usage_date, run_id, run_started_at, reconciled_at)
VALUES (%(usage_date)s, %(run_id)s, %(run_started_at)s, %(reconciled_at)s)
ON CONFLICT (usage_date, run_id) DO UPDATE SET reconciled_at = EXCLUDED.reconciled_at
