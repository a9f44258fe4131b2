-- One time slice of the look-back window for one org shard, read through ADBC like
-- heartbeats_window.sql: the heartbeats of the shard's instances, and for shard 0
-- also those of null or unknown ids (quarantined). The instance sets come from
-- shard_instances.sql; both subqueries are hashed, the sent_at index applies.
SELECT instance_id, sent_at, active, received_at
FROM heartbeats
WHERE sent_at >= current_setting('tally.part_start')::timestamptz
  AND sent_at < current_setting('tally.part_end')::timestamptz
  AND (instance_id IN (
         SELECT json_array_elements_text(current_setting('tally.shard_instances')::json))
       OR (current_setting('tally.owns_unknown') = 'on'
           AND (instance_id IS NULL
                OR instance_id NOT IN (
                  SELECT json_array_elements_text(current_setting('tally.known_instances')::json)))))
