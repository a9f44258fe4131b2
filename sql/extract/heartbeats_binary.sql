-- The look-back window's heartbeats as fixed-width binary rows (40 bytes each):
-- instance code (-1: null or unknown id, fetched again as text), sent_at, active as
-- int2 (1 true, 0 false, 2 null), received_at. No text formatting on the server.
COPY (
  SELECT coalesce(c.code, -1),
         h.sent_at,
         coalesce(h.active::int, 2)::int2,
         h.received_at
  FROM heartbeats h
  LEFT JOIN tally_instance_codes c ON c.instance_id = h.instance_id
  WHERE h.sent_at >= %(part_start)s AND h.sent_at < %(part_end)s
) TO STDOUT (FORMAT binary)
