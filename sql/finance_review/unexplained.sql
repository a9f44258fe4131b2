-- Money-moving discrepancies nobody has explained yet, across all usage days.
SELECT usage_date, kind, org_id, tier, instance_id, provider, delta_seconds, dollar_impact,
       money_moving, explained, detail
FROM billing.discrepancies
WHERE money_moving AND NOT explained
ORDER BY usage_date, kind, org_id, tier
