-- What the push ledger holds per day and tier: seconds the provider acknowledged
-- (sent) and seconds not acknowledged yet (pending, failed, cancelling).
SELECT usage_date, tier,
       coalesce(sum(quantity) FILTER (WHERE status = 'sent'), 0) AS sent_seconds,
       coalesce(sum(quantity) FILTER (WHERE status IN ('pending', 'failed', 'cancelling')), 0)
         AS unsent_seconds
FROM billing.usage_push_ledger
WHERE org_id = %(org_id)s
  AND usage_date >= %(month_start)s AND usage_date < %(next_month)s
GROUP BY usage_date, tier
ORDER BY usage_date, tier
