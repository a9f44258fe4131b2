DELETE FROM billing.provider_reads WHERE usage_date = %(usage_date)s
