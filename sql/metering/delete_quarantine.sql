DELETE FROM billing.quarantine WHERE usage_date = %(usage_date)s
