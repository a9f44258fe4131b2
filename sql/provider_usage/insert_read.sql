INSERT INTO billing.provider_reads
  (usage_date, provider, status, customers, calls, unread_tiers, unattributed_seconds, note, part)
VALUES (%(usage_date)s, %(provider)s, %(status)s, %(customers)s, %(calls)s, %(unread_tiers)s,
        %(unattributed_seconds)s, %(note)s, %(part)s)
