-- One quota_usage writer per month at a time (transaction lock): a run reads the
-- month's usage and its already computed days, then rewrites them, without a
-- concurrent run of another day of the month slipping in between.
SELECT pg_advisory_xact_lock(hashtext('quota_usage_month'), hashtext(%(month)s))
