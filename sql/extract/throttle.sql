-- Per-org throttle settings as stored (minutes); orgs without a row use the defaults.
-- Values are checked per org before use (assets/extract.py, checked_throttle).
SELECT org_id, continuous_limit_minutes, daily_limit_minutes, idle_timeout_minutes
FROM throttle_settings
