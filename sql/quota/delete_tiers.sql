DELETE FROM billing.quota_usage_tiers WHERE usage_date = %(usage_date)s
