COPY billing.quarantine (usage_date, instance_id, sent_at, active, received_at, reason, part)
FROM STDIN
