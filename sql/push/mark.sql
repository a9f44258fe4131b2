-- sent_at: when the provider first accepted the event; set once, never moved by a
-- later answer. A duplicate answer means an earlier attempt was accepted: the
-- row's creation time is the earliest that can have been.
UPDATE billing.usage_push_ledger
SET status = %(status)s,
    attempts = attempts + 1,
    last_error = %(last_error)s,
    sent_at = CASE
      WHEN %(status)s = 'sent'
        THEN coalesce(sent_at, CASE WHEN %(received_earlier)s THEN created_at ELSE now() END)
      ELSE sent_at
    END,
    updated_at = now()
WHERE identifier = %(identifier)s
