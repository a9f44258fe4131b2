DELETE FROM billing.provider_usage WHERE usage_date = %(usage_date)s
