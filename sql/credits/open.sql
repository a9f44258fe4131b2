-- Open credit proposals across all usage days, oldest day first (`tally credits list`).
SELECT proposal_id, org_id, usage_date, tier, provider, kind, seconds, amount, net_amount,
       included_seconds, escalation, systemic, approved_by, approver_level, ticket_id,
       approved_at, created_at
FROM billing.credit_proposals
WHERE status = 'proposed'
ORDER BY usage_date, proposal_id
