UPDATE billing.usage_push_ledger
SET status = %(status)s,
    attempts = attempts + 1,
    last_error = %(last_error)s,
    sent_at = CASE WHEN %(status)s = 'sent' THEN coalesce(sent_at, now()) ELSE sent_at END,
    updated_at = now()
WHERE identifier = %(identifier)s
