-- Price, route and address an existing proposal (usage_push's push_over_sent rows).
UPDATE billing.credit_proposals
SET amount = %(amount)s, customer_id = coalesce(customer_id, %(customer_id)s),
    escalation = %(escalation)s, systemic = %(systemic)s, net_amount = %(net_amount)s,
    included_seconds = %(included_seconds)s, updated_at = now()
WHERE proposal_id = %(proposal_id)s AND status = 'proposed'
