-- Billable seconds of some orgs over one whole month (every day known so far): what
-- a credit net of included hours is priced against.
SELECT org_id, usage_date, tier, billable_seconds
FROM billing.billed_usage
WHERE org_id = ANY(%(org_ids)s)
  AND usage_date >= %(month_start)s AND usage_date < %(next_month)s
  AND billable_seconds > 0
ORDER BY org_id, usage_date, tier
