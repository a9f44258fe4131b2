-- Heartbeats needed for one usage day: the look-back window by sent_at (index
-- range), plus rows whose sent_at cannot be trusted (null, or later than the run
-- time allows) received during the day, so they are quarantined, not lost.
COPY (
  SELECT instance_id, sent_at, active, received_at
  FROM heartbeats
  WHERE sent_at >= %(window_start)s AND sent_at < %(window_end)s
  UNION ALL
  SELECT instance_id, sent_at, active, received_at
  FROM heartbeats
  WHERE (sent_at IS NULL OR sent_at >= %(future_after)s)
    AND NOT (sent_at >= %(window_start)s AND sent_at < %(window_end)s)
    AND received_at >= %(day_start)s AND received_at < %(day_end)s
) TO STDOUT WITH (FORMAT csv)
