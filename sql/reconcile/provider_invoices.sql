SELECT provider, customer_id, invoice_id, period_start, period_end, finalized_at, tier, seconds
FROM billing.provider_invoices
WHERE usage_date = %(usage_date)s
