-- Budget and spend alerts of one org and month, whatever their status.
SELECT kind, threshold, status, usage_date, billable_seconds, included_seconds, spend,
       recipient, attempts, last_error, created_at, sent_at
FROM billing.budget_alert_ledger
WHERE org_id = %(org_id)s AND month = %(month_start)s
ORDER BY kind, threshold
