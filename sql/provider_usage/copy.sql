COPY billing.provider_usage (usage_date, org_id, tier, provider, customer_id, seconds, exact,
                            part)
FROM STDIN
