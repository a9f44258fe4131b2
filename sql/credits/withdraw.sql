-- The over-charge is gone (re-reconciled): the unapplied proposal is withdrawn.
UPDATE billing.credit_proposals
SET status = 'withdrawn', updated_at = now()
WHERE proposal_id = %(proposal_id)s AND status = 'proposed'
