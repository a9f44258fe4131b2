-- `tally credits approve`: the approval is recorded; `tally credits apply` pays it.
UPDATE billing.credit_proposals
SET approved_by = %(approved_by)s, approver_level = %(approver_level)s,
    ticket_id = %(ticket_id)s, approved_at = now(), updated_at = now()
WHERE proposal_id = %(proposal_id)s AND status = 'proposed'
