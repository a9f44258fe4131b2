-- Sent (delivered) and pending (delivery unknown) seconds per (org, tier) and the
-- (provider, customer) they went to.
SELECT org_id, tier, provider, customer_id,
       coalesce(sum(quantity) FILTER (WHERE status IN ('sent', 'cancel_refused')), 0)::bigint
         AS sent_seconds,
       coalesce(sum(quantity) FILTER (WHERE status = 'pending'), 0)::bigint AS pending_seconds
FROM billing.usage_push_ledger
WHERE usage_date = %(usage_date)s
GROUP BY org_id, tier, provider, customer_id
