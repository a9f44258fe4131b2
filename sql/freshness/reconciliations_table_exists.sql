SELECT to_regclass('billing.reconciliations') IS NOT NULL
