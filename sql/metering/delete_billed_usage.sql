DELETE FROM billing.billed_usage WHERE usage_date = %(usage_date)s
