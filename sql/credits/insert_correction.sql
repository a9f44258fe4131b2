INSERT INTO billing.billing_corrections
  (proposal_id, org_id, usage_date, tier, provider, customer_id, amount, list_amount, currency,
   method, provider_reference, reason, approved_by, approver_level, ticket_id, notice_status,
   notice_recipient)
VALUES (%(proposal_id)s, %(org_id)s, %(usage_date)s, %(tier)s, %(provider)s, %(customer_id)s,
        %(amount)s, %(list_amount)s, %(currency)s, %(method)s, %(provider_reference)s,
        %(reason)s, %(approved_by)s, %(approver_level)s, %(ticket_id)s, %(notice_status)s,
        %(notice_recipient)s)
ON CONFLICT (proposal_id) DO NOTHING
