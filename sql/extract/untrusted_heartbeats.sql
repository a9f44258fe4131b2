-- Rows whose sent_at cannot be trusted (null, or later than the run allows) and
-- that fall outside the window: they belong to the day they were received. A null
-- sent_at is never inside the window (spelled out: NOT (NULL ...) would be NULL).
SELECT instance_id, sent_at, active, received_at
FROM heartbeats
WHERE (sent_at IS NULL
       OR (sent_at >= %(future_after)s
           AND NOT (sent_at >= %(window_start)s AND sent_at < %(window_end)s)))
  AND received_at >= %(day_start)s AND received_at < %(day_end)s
