UPDATE billing.run_failure_alerts
SET status = %(status)s,
    channels = %(channels)s,
    errors = %(errors)s,
    attempts = attempts + 1,
    sent_at = CASE WHEN %(status)s IN ('sent', 'logged') THEN %(now)s::timestamptz END,
    updated_at = %(now)s
WHERE alert_id = %(alert_id)s
