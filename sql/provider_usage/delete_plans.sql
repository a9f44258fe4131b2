DELETE FROM billing.provider_plans WHERE usage_date = %(usage_date)s
