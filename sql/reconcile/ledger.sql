-- Sent (delivered) and pending (delivery unknown) seconds per (org, tier).
SELECT org_id, tier,
       coalesce(sum(quantity) FILTER (WHERE status = 'sent'), 0)::bigint AS sent_seconds,
       coalesce(sum(quantity) FILTER (WHERE status = 'pending'), 0)::bigint AS pending_seconds
FROM billing.usage_push_ledger
WHERE usage_date = %(usage_date)s
GROUP BY org_id, tier
