SELECT provider, status, customers, calls, unread_tiers, unattributed_seconds, note, read_at
FROM billing.provider_reads
WHERE usage_date = %(usage_date)s
