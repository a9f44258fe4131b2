SELECT provider, customer_id, known
FROM billing.provider_customers
WHERE usage_date = %(usage_date)s
