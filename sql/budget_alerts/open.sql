-- Every row of each (org, month) that still has something to settle.
SELECT l.org_id, l.month, l.threshold, l.status, l.usage_date, l.billable_seconds,
       l.included_seconds, l.recipient, l.attempts
FROM billing.budget_alert_ledger l
WHERE EXISTS (
  SELECT 1 FROM billing.budget_alert_ledger o
  WHERE o.org_id = l.org_id AND o.month = l.month
    AND o.status IN ('queued', 'pending', 'failed')
)
ORDER BY l.month, l.org_id, l.threshold
