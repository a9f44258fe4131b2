-- One usage day at a glance, for the CLI and the demo report.
SELECT count(DISTINCT org_id) AS orgs,
       coalesce(sum(runtime_seconds), 0) AS runtime_seconds,
       coalesce(sum(idle_paused_seconds), 0) AS idle_paused_seconds,
       coalesce(sum(over_continuous_seconds), 0) AS over_continuous_seconds,
       coalesce(sum(over_daily_seconds), 0) AS over_daily_seconds,
       coalesce(sum(billable_seconds), 0) AS billable_seconds,
       (SELECT count(*) FROM billing.quarantine q WHERE q.usage_date = %(usage_date)s)
         AS quarantined,
       (SELECT coalesce(sum(quantity), 0) FROM billing.usage_push_ledger l
         WHERE l.usage_date = %(usage_date)s AND l.status IN ('sent', 'cancel_refused'))
         AS pushed_seconds,
       (SELECT coalesce(sum(seconds), 0) FROM billing.provider_usage p
         WHERE p.usage_date = %(usage_date)s) AS recorded_seconds,
       (SELECT count(*) FROM billing.discrepancies d
         WHERE d.usage_date = %(usage_date)s) AS discrepancies
FROM billing.billed_usage
WHERE usage_date = %(usage_date)s
