-- A threshold crossed for the first time; a row already there (any status) wins.
INSERT INTO billing.budget_alert_ledger
  (org_id, month, kind, threshold, status, usage_date, billable_seconds, included_seconds,
   spend, recipient)
VALUES (%(org_id)s, %(month)s, %(kind)s, %(threshold)s, 'queued', %(usage_date)s,
        %(billable_seconds)s, %(included_seconds)s, %(spend)s, %(recipient)s)
ON CONFLICT (org_id, month, kind, threshold) DO NOTHING
