-- When tally last sent usage to, and last cancelled usage at, each (provider,
-- customer) for the day: differences younger than the settlement window may be the
-- provider still processing them (DESIGN §8).
SELECT provider, customer_id,
       max(updated_at) FILTER (WHERE status IN ('sent', 'cancel_refused', 'pending'))
         AS last_sent_at,
       max(updated_at) FILTER (WHERE status IN ('cancelled', 'cancelling')) AS last_cancel_at
FROM billing.usage_push_ledger
WHERE usage_date = %(usage_date)s
GROUP BY provider, customer_id
