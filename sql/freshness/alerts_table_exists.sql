SELECT to_regclass('billing.freshness_alerts') IS NOT NULL
