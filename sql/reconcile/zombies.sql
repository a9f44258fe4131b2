-- Heartbeats sent after the instance stopped, quarantined by billed_usage.
SELECT instance_id, count(DISTINCT sent_at)::bigint AS heartbeats,
       min(sent_at) AS first_at, max(sent_at) AS last_at
FROM billing.quarantine
WHERE usage_date = %(usage_date)s AND reason = 'after_stop'
GROUP BY instance_id
