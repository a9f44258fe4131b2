UPDATE billing.billing_corrections
SET notice_status = %(notice_status)s, notice_error = %(notice_error)s,
    notice_sent_at = CASE WHEN %(notice_status)s = 'sent' THEN now() END
WHERE proposal_id = %(proposal_id)s AND notice_status = 'pending'
