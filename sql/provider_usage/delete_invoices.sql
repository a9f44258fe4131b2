DELETE FROM billing.provider_invoices WHERE usage_date = %(usage_date)s
