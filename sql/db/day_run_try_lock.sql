-- One `tally run` per usage day at a time (session lock, released when the
-- process ends, even by SIGKILL): true when this process now holds the day.
SELECT pg_try_advisory_lock(hashtext('tally_run'), hashtext(%(usage_date)s))
