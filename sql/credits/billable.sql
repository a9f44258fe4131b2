-- One org's billable seconds per tier on one day (re-read before paying).
SELECT tier, billable_seconds
FROM billing.billed_usage
WHERE org_id = %(org_id)s AND usage_date = %(usage_date)s
