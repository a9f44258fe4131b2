INSERT INTO billing.metered_days
  (usage_date, part, window_start, window_end, heartbeats_seen, counted_at, run_id)
VALUES (%(usage_date)s, %(part)s, %(window_start)s, %(window_end)s, %(heartbeats_seen)s,
        %(counted_at)s, %(run_id)s)
ON CONFLICT (usage_date, part) DO UPDATE SET
  window_start = EXCLUDED.window_start,
  window_end = EXCLUDED.window_end,
  heartbeats_seen = EXCLUDED.heartbeats_seen,
  counted_at = EXCLUDED.counted_at,
  run_id = EXCLUDED.run_id
