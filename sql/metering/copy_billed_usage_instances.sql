COPY billing.billed_usage_instances (org_id, usage_date, instance_id, tier, runtime_seconds,
                                     idle_paused_seconds, over_continuous_seconds,
                                     over_daily_seconds, billable_seconds, part)
FROM STDIN
