INSERT INTO billing.credit_proposals (org_id, usage_date, tier, provider, kind, seconds, evidence)
VALUES (%(org_id)s, %(usage_date)s, %(tier)s, %(provider)s, 'push_over_sent', %(seconds)s,
        %(evidence)s)
ON CONFLICT (org_id, usage_date, tier, kind) DO UPDATE
SET seconds = EXCLUDED.seconds, evidence = EXCLUDED.evidence
WHERE billing.credit_proposals.status = 'proposed'
