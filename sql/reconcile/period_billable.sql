-- tally's billable seconds per (org, tier) over a billing period's days.
SELECT org_id, tier, sum(billable_seconds)::bigint AS billable_seconds
FROM billing.billed_usage
WHERE usage_date >= %(period_first)s AND usage_date < %(period_end)s
GROUP BY org_id, tier
