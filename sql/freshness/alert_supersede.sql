UPDATE billing.freshness_alerts
SET status = 'superseded', updated_at = %(now)s
WHERE alert_id = %(alert_id)s AND status = 'failed'
