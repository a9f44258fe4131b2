INSERT INTO billing.provider_plans (usage_date, org_id, provider, customer_id, plan, status, part)
VALUES (%(usage_date)s, %(org_id)s, %(provider)s, %(customer_id)s, %(plan)s, %(status)s,
        %(part)s)
