-- One time slice of the look-back window as stored, read through ADBC as binary COPY
-- into Arrow record batches. The bounds come from window_slice.sql (current_setting
-- is stable, so the sent_at index applies). Ids are coded on the client, so a null or
-- unknown id arrives as it was sent and is quarantined with it.
SELECT instance_id, sent_at, active, received_at
FROM heartbeats
WHERE sent_at >= current_setting('tally.part_start')::timestamptz
  AND sent_at < current_setting('tally.part_end')::timestamptz
