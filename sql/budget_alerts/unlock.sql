SELECT pg_advisory_unlock(hashtext('budget_alerts'), 0)
