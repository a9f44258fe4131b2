-- A refused approval or payment: nothing was applied.
INSERT INTO billing.credit_refusals
  (proposal_id, approver, approver_level, proposal_level, net_amount, ticket_id, reason, detail)
VALUES (%(proposal_id)s, %(approver)s, %(approver_level)s, %(proposal_level)s, %(net_amount)s,
        %(ticket_id)s, %(reason)s, %(detail)s)
