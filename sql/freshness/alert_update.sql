UPDATE billing.freshness_alerts
SET reasons = %(reasons)s,
    last_success_at = %(last_success_at)s,
    newest_day = %(newest_day)s,
    status = %(status)s,
    channels = %(channels)s,
    errors = %(errors)s,
    attempts = attempts + 1,
    sent_at = CASE WHEN %(status)s IN ('sent', 'logged') THEN %(now)s::timestamptz END,
    updated_at = %(now)s
WHERE alert_id = %(alert_id)s AND state = %(state)s AND status = 'failed'
RETURNING alert_id
