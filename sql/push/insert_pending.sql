INSERT INTO billing.usage_push_ledger
  (org_id, usage_date, tier, seq, provider, customer_id, quantity, identifier, status)
VALUES (%(org_id)s, %(usage_date)s, %(tier)s, %(seq)s, %(provider)s, %(customer_id)s,
        %(quantity)s, %(identifier)s, 'pending')
