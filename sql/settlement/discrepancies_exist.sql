SELECT to_regclass('billing.discrepancies') IS NOT NULL
