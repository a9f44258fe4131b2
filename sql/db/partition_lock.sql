-- One writer per (stage, usage day): concurrent runs of a partition queue here.
SELECT pg_advisory_xact_lock(hashtext(%(stage)s), hashtext(%(usage_date)s))
