SELECT alert_id, state, reasons, last_success_at, newest_day, status, channels, errors,
       attempts, detected_at, sent_at, updated_at
FROM billing.freshness_alerts
ORDER BY alert_id DESC
LIMIT 1
