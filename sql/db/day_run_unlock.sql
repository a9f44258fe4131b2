SELECT pg_advisory_unlock(hashtext('tally_run'), hashtext(%(usage_date)s))
