-- Thresholds already in the ledger for the given months (report-only preview).
SELECT org_id, month, kind, threshold
FROM billing.budget_alert_ledger
WHERE month = ANY(%(months)s)
