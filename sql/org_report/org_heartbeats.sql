-- Control plane: the org's heartbeats in the day's look-back window that had arrived
-- when the day was metered (later ones are late: `tally late`).
SELECT h.instance_id, h.sent_at, h.active, h.received_at
FROM heartbeats h
JOIN instances i ON i.instance_id = h.instance_id
WHERE i.org_id = %(org_id)s
  AND h.sent_at >= %(window_start)s AND h.sent_at < %(window_end)s
  AND h.received_at <= %(metered_at)s
