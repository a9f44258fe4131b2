-- Credit proposals waiting for approval, across all usage days (oldest first).
SELECT proposal_id, org_id, usage_date, tier, kind, seconds, amount, net_amount, escalation,
       created_at
FROM billing.credit_proposals
WHERE status = 'proposed'
ORDER BY created_at, proposal_id
