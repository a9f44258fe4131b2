-- Committed right before the SMTP hand-off: a crash leaves `pending`, never re-sent.
UPDATE billing.billing_corrections
SET notice_status = 'pending', notice_attempts = notice_attempts + 1
WHERE proposal_id = %(proposal_id)s AND notice_status IN ('owed', 'failed')
RETURNING proposal_id
