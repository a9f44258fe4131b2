COPY billing.provider_customers (usage_date, provider, customer_id, known, part) FROM STDIN
