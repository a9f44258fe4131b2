SELECT to_regclass('billing.metered_days') IS NOT NULL
