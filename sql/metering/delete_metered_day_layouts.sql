-- The day's metered-window records of an earlier shard layout (assets/shards.py):
-- replaced by this layout's parts.
DELETE FROM billing.metered_days
WHERE usage_date = %(usage_date)s AND NOT (part = ANY(%(parts)s))
