SELECT pg_advisory_unlock(hashtext('usage_push'), hashtext(%(usage_date)s))
