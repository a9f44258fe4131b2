-- Control plane: the org's throttle settings as stored (minutes), if any.
SELECT org_id, continuous_limit_minutes, daily_limit_minutes, idle_timeout_minutes
FROM throttle_settings
WHERE org_id = %(org_id)s
