-- The part's own rows, rows of an earlier shard layout and rows of the customers
-- it reads (assets/provider_usage.py ReadScope, assets/shards.py).
DELETE FROM billing.provider_usage WHERE usage_date = %(usage_date)s
  AND (part = %(part)s OR NOT (part = ANY(%(parts)s))
       -- a customer this read-back reads, whichever part read it before
       OR (provider, customer_id) IN (
         SELECT * FROM unnest(%(read_providers)s::text[], %(read_customers)s::text[])))
