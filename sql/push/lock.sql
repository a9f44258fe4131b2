-- Session lock per usage day: a concurrent push of the same day waits, then finds
-- everything already in the ledger and sends nothing.
SELECT pg_advisory_lock(hashtext('usage_push'), hashtext(%(usage_date)s))
