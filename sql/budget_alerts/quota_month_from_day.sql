-- Month to date of every org with included hours, as of the partition day and as of
-- each later day of its month that quota_usage has computed (a re-run of an earlier
-- day recomputes those in the same run), in date order.
SELECT org_id, month, usage_date, plan, included_seconds, billable_seconds
FROM billing.quota_usage
WHERE usage_date >= %(usage_date)s AND usage_date < %(next_month)s AND included_seconds > 0
ORDER BY usage_date, org_id
