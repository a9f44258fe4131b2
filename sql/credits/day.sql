SELECT proposal_id, org_id, usage_date, tier, provider, kind, seconds, amount, evidence,
       customer_id, escalation, systemic, status, approved_by, approved_at
FROM billing.credit_proposals
WHERE usage_date = %(usage_date)s
ORDER BY proposal_id
