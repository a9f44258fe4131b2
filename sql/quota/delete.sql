DELETE FROM billing.quota_usage WHERE usage_date = %(usage_date)s
