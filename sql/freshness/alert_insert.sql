INSERT INTO billing.freshness_alerts
  (state, reasons, last_success_at, newest_day, status, channels, errors, attempts,
   detected_at, sent_at, updated_at)
VALUES
  (%(state)s, %(reasons)s, %(last_success_at)s, %(newest_day)s, %(status)s, %(channels)s,
   %(errors)s, 1, %(now)s,
   CASE WHEN %(status)s IN ('sent', 'logged') THEN %(now)s::timestamptz END, %(now)s)
RETURNING alert_id
