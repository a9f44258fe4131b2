SELECT count(*) AS pending
FROM billing.usage_push_ledger
WHERE status = 'pending'
