-- A reconciliation credit proposal; never touches one already applied.
INSERT INTO billing.credit_proposals
  (org_id, usage_date, tier, provider, kind, seconds, amount, evidence, customer_id,
   escalation, systemic, net_amount, included_seconds)
VALUES (%(org_id)s, %(usage_date)s, %(tier)s, %(provider)s, %(kind)s, %(seconds)s, %(amount)s,
        %(evidence)s, %(customer_id)s, %(escalation)s, %(systemic)s, %(net_amount)s,
        %(included_seconds)s)
ON CONFLICT (org_id, usage_date, tier, kind) DO UPDATE
SET provider = EXCLUDED.provider, seconds = EXCLUDED.seconds, amount = EXCLUDED.amount,
    evidence = EXCLUDED.evidence, customer_id = EXCLUDED.customer_id,
    escalation = EXCLUDED.escalation, systemic = EXCLUDED.systemic,
    net_amount = EXCLUDED.net_amount, included_seconds = EXCLUDED.included_seconds,
    status = 'proposed', updated_at = now()
WHERE billing.credit_proposals.status IN ('proposed', 'withdrawn')
