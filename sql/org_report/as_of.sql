-- The newest metered day of the month, any org: "data through" for tally org.
SELECT max(usage_date) AS as_of
FROM billing.billed_usage
WHERE usage_date >= %(month_start)s AND usage_date < %(next_month)s
