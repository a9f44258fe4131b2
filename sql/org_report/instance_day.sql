-- The stored per-instance row of one day, and when the day was metered (any org).
SELECT (SELECT max(computed_at) FROM billing.billed_usage WHERE usage_date = %(usage_date)s)
         AS metered_at,
       i.runtime_seconds, i.idle_paused_seconds, i.over_continuous_seconds,
       i.over_daily_seconds, i.billable_seconds
FROM (SELECT 1) one
LEFT JOIN billing.billed_usage_instances i
  ON i.usage_date = %(usage_date)s AND i.org_id = %(org_id)s
 AND i.instance_id = %(instance_id)s
