UPDATE billing.budget_alert_ledger
SET status = %(status)s,
    last_error = CASE WHEN %(status)s = 'sent' THEN NULL
                      ELSE coalesce(%(last_error)s, last_error) END,
    attempts = attempts + CASE WHEN %(status)s = 'pending' THEN 1 ELSE 0 END,
    sent_at = CASE WHEN %(status)s = 'sent' THEN now() ELSE sent_at END,
    updated_at = now()
WHERE org_id = %(org_id)s AND month = %(month)s AND kind = %(kind)s
  AND threshold = %(threshold)s
