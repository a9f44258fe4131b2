-- Credit proposals of the day (to mark credited over-charges as explained).
SELECT proposal_id, org_id, tier, kind, provider, seconds, amount, status
FROM billing.credit_proposals
WHERE usage_date = %(usage_date)s
