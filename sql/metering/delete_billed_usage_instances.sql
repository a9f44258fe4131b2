DELETE FROM billing.billed_usage_instances WHERE usage_date = %(usage_date)s
