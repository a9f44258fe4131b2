-- Month-to-date charges of every org without included hours, as of the partition day
-- and each later day of its month that quota_usage computed (as quota_month_from_day).
SELECT org_id, month, usage_date, plan, billable_seconds, expected_charges
FROM billing.quota_usage
WHERE usage_date >= %(usage_date)s AND usage_date < %(next_month)s AND included_seconds = 0
ORDER BY usage_date, org_id
