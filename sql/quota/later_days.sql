-- Days of the partition's month after the partition day that already have quota rows.
SELECT DISTINCT usage_date
FROM billing.quota_usage
WHERE usage_date > %(usage_date)s AND usage_date < %(next_month)s
ORDER BY usage_date
