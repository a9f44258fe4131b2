-- The part's own rows (and rows of an earlier shard layout); see assets/shards.py.
DELETE FROM billing.billed_usage_instances WHERE usage_date = %(usage_date)s
  AND (part = %(part)s OR NOT (part = ANY(%(parts)s)))
