-- billing.discrepancies comes with the reconciliation stage; absent before it.
SELECT to_regclass('billing.discrepancies') IS NOT NULL AS present
