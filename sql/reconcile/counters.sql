-- The control plane's own running tally for the day.
SELECT org_id, tier, runtime_seconds, updated_at
FROM usage_counters
WHERE usage_date = %(usage_date)s
