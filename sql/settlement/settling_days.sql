-- Days from `since` on whose last reconciliation still has differences the provider
-- may be processing: re-read and re-reconciled until they converge.
SELECT DISTINCT usage_date
FROM billing.discrepancies
WHERE kind = 'provider_settling' AND usage_date >= %(since)s AND usage_date < %(before)s
ORDER BY usage_date
