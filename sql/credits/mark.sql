UPDATE billing.credit_proposals
SET status = %(status)s, approved_by = %(approved_by)s, approved_at = now(),
    approver_level = %(approver_level)s, ticket_id = %(ticket_id)s,
    net_amount = %(net_amount)s, included_seconds = %(included_seconds)s,
    escalation = %(escalation)s,
    customer_id = coalesce(customer_id, %(customer_id)s), updated_at = now()
WHERE proposal_id = %(proposal_id)s
