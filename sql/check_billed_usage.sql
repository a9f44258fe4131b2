-- Invariants of billing.billed_usage for one day (DESIGN §4 blocking checks).
SELECT
  count(*) FILTER (WHERE runtime_seconds <> idle_paused_seconds + over_continuous_seconds
                                         + over_daily_seconds + billable_seconds)
    AS identity_violations,
  count(*) FILTER (WHERE least(runtime_seconds, idle_paused_seconds, over_continuous_seconds,
                               over_daily_seconds, billable_seconds) < 0)
    AS negative_rows,
  count(*) AS row_count
FROM billing.billed_usage
WHERE usage_date = %(usage_date)s
