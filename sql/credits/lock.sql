-- One proposal under a row lock: a concurrent issue_credits waits here until the
-- first commits, then sees the proposal applied.
SELECT proposal_id, org_id, usage_date, tier, provider, kind, seconds, amount, net_amount,
       included_seconds, currency, evidence, customer_id, escalation, systemic, status
FROM billing.credit_proposals
WHERE proposal_id = %(proposal_id)s
FOR UPDATE
