-- What the provider recorded per day and tier (read back by provider_usage).
SELECT usage_date, tier, sum(seconds) AS provider_seconds, bool_and(exact) AS exact
FROM billing.provider_usage
WHERE org_id = %(org_id)s
  AND usage_date >= %(month_start)s AND usage_date < %(next_month)s
GROUP BY usage_date, tier
ORDER BY usage_date, tier
