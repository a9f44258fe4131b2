DELETE FROM billing.push_refusals WHERE usage_date = %(usage_date)s
