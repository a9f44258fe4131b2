-- (org, tier) rows of the day whose billed_usage differs from the sum of its
-- billed_usage_instances (either side missing counts): the check instances_sum_to_orgs.
WITH per_instance AS (
  SELECT org_id, tier, sum(runtime_seconds) AS runtime_seconds,
         sum(idle_paused_seconds) AS idle_paused_seconds,
         sum(over_continuous_seconds) AS over_continuous_seconds,
         sum(over_daily_seconds) AS over_daily_seconds,
         sum(billable_seconds) AS billable_seconds
  FROM billing.billed_usage_instances
  WHERE usage_date = %(usage_date)s AND part = %(part)s
  GROUP BY org_id, tier
), per_org AS (
  SELECT org_id, tier, runtime_seconds, idle_paused_seconds, over_continuous_seconds,
         over_daily_seconds, billable_seconds
  FROM billing.billed_usage
  WHERE usage_date = %(usage_date)s AND part = %(part)s
)
SELECT coalesce(o.org_id, i.org_id) AS org_id, coalesce(o.tier, i.tier) AS tier
FROM per_org o
FULL OUTER JOIN per_instance i ON i.org_id = o.org_id AND i.tier = o.tier
WHERE (o.runtime_seconds, o.idle_paused_seconds, o.over_continuous_seconds,
       o.over_daily_seconds, o.billable_seconds)
      IS DISTINCT FROM
      (i.runtime_seconds, i.idle_paused_seconds, i.over_continuous_seconds,
       i.over_daily_seconds, i.billable_seconds)
ORDER BY 1, 2
