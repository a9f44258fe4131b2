-- Month to date of every org with included hours, as of the partition day.
SELECT org_id, month, usage_date, plan, included_seconds, billable_seconds
FROM billing.quota_usage
WHERE usage_date = %(usage_date)s AND included_seconds > 0
ORDER BY org_id
