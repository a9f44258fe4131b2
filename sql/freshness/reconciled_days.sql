SELECT DISTINCT usage_date FROM billing.reconciliations
