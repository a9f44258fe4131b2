-- Rows of the window whose instance id is null or unknown, looked up by their
-- sent_at (index) so they are quarantined with the id they really carried.
SELECT h.instance_id, h.sent_at, h.active, h.received_at
FROM heartbeats h
WHERE h.sent_at = ANY(%(sent_at)s)
  AND h.sent_at >= %(part_start)s AND h.sent_at < %(part_end)s
  AND NOT EXISTS (SELECT 1 FROM tally_instance_codes c WHERE c.instance_id = h.instance_id)
