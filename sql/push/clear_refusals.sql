-- The part's own rows (and rows of an earlier shard layout); see assets/shards.py.
DELETE FROM billing.push_refusals WHERE usage_date = %(usage_date)s
  AND (part = %(part)s OR NOT (part = ANY(%(parts)s)))
