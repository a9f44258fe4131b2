-- Customer e-mails still owed (never sent, or refused by the server) for some proposals.
SELECT c.proposal_id, c.org_id, c.usage_date, c.tier, c.amount, c.currency, c.method,
       c.ticket_id, c.notice_recipient, p.seconds
FROM billing.billing_corrections c
JOIN billing.credit_proposals p USING (proposal_id)
WHERE c.proposal_id = ANY(%(proposal_ids)s) AND c.notice_status IN ('owed', 'failed')
ORDER BY c.proposal_id
