DELETE FROM billing.discrepancies WHERE usage_date = %(usage_date)s
