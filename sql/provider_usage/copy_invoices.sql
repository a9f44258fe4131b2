COPY billing.provider_invoices (usage_date, provider, customer_id, invoice_id, period_start,
  period_end, finalized_at, tier, seconds, part) FROM STDIN
