-- Every row of each (org, month, kind) that still has something to settle; not_mailed
-- rows (recorded while SMTP was unset) are owed once SMTP is configured.
SELECT l.org_id, l.month, l.kind, l.threshold, l.status, l.usage_date, l.billable_seconds,
       l.included_seconds, l.spend, l.recipient, l.attempts
FROM billing.budget_alert_ledger l
WHERE EXISTS (
  SELECT 1 FROM billing.budget_alert_ledger o
  WHERE o.org_id = l.org_id AND o.month = l.month AND o.kind = l.kind
    AND o.status IN ('queued', 'pending', 'failed', 'not_mailed')
)
ORDER BY l.month, l.org_id, l.kind, l.threshold
