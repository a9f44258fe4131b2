-- Metered days from `since` on, with what their metering saw.
SELECT usage_date, window_start, window_end, heartbeats_seen, counted_at, run_id, part
FROM billing.metered_days
WHERE usage_date >= %(since)s AND usage_date <= %(until)s
ORDER BY usage_date, part
