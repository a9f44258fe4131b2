-- What the ledger says reached each provider for the day, per (customer, tier).
SELECT provider, customer_id, tier, sum(quantity)::bigint AS seconds
FROM billing.usage_push_ledger
WHERE usage_date = %(usage_date)s AND status = 'sent'
GROUP BY provider, customer_id, tier
