INSERT INTO billing.billing_corrections
  (proposal_id, org_id, usage_date, tier, provider, customer_id, amount, currency, method,
   provider_reference, reason, approved_by)
VALUES (%(proposal_id)s, %(org_id)s, %(usage_date)s, %(tier)s, %(provider)s, %(customer_id)s,
        %(amount)s, %(currency)s, %(method)s, %(provider_reference)s, %(reason)s,
        %(approved_by)s)
ON CONFLICT (proposal_id) DO NOTHING
