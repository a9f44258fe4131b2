-- One budget_alerts sender at a time (any partition): a pending row seen while
-- holding this lock was left by a run that died, never by one still sending.
SELECT pg_advisory_lock(hashtext('budget_alerts'), 0)
