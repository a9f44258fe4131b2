SELECT proposal_id, org_id, usage_date, tier, provider, kind, seconds, amount, evidence,
       customer_id, escalation, systemic, status, approved_by, approved_at, net_amount,
       included_seconds, approver_level, ticket_id
FROM billing.credit_proposals
WHERE usage_date = %(usage_date)s
ORDER BY proposal_id
