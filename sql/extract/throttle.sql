-- Per-org throttle settings in seconds; orgs without a row use the defaults.
SELECT org_id,
       continuous_limit_minutes::bigint * 60 AS continuous_limit_s,
       daily_limit_minutes::bigint * 60 AS daily_limit_s,
       idle_timeout_minutes::bigint * 60 AS idle_timeout_s
FROM throttle_settings
