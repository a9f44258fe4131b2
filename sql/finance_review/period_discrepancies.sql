-- Every discrepancy of a span of usage days (the month to date), for the totals.
SELECT usage_date, kind, org_id, tier, instance_id, provider, delta_seconds, dollar_impact,
       money_moving, explained, detail
FROM billing.discrepancies
WHERE usage_date BETWEEN %(start_date)s AND %(end_date)s
ORDER BY usage_date, kind, org_id, tier
