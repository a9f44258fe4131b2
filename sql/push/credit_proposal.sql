-- What stands at the provider beyond billable and can no longer be cancelled, at
-- the (provider, customer) that received it.
INSERT INTO billing.credit_proposals
  (org_id, usage_date, tier, provider, customer_id, kind, seconds, evidence)
VALUES (%(org_id)s, %(usage_date)s, %(tier)s, %(provider)s, %(customer_id)s, 'push_over_sent',
        %(seconds)s, %(evidence)s)
ON CONFLICT (org_id, usage_date, tier, kind) DO UPDATE
SET seconds = EXCLUDED.seconds, evidence = EXCLUDED.evidence, provider = EXCLUDED.provider,
    customer_id = EXCLUDED.customer_id
WHERE billing.credit_proposals.status = 'proposed'
