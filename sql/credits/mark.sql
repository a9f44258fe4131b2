UPDATE billing.credit_proposals
SET status = %(status)s, approved_by = %(approved_by)s, approved_at = now(),
    customer_id = coalesce(customer_id, %(customer_id)s), updated_at = now()
WHERE proposal_id = %(proposal_id)s
