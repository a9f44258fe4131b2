SELECT org_id, tier, seq, provider, customer_id, quantity, identifier, status, sent_at, created_at
FROM billing.usage_push_ledger
WHERE usage_date = %(usage_date)s
ORDER BY org_id, tier, seq
