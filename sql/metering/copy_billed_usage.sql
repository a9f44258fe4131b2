COPY billing.billed_usage (org_id, usage_date, tier, runtime_seconds, idle_paused_seconds,
                           over_continuous_seconds, over_daily_seconds, billable_seconds,
                           part)
FROM STDIN
