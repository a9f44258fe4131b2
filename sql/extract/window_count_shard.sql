-- window_count.sql for one org shard: the heartbeats of the shard's instances (and,
-- for shard 0, of null or unknown ids) the look-back window holds right now.
SELECT count(*), now()
FROM heartbeats
WHERE sent_at >= %(window_start)s AND sent_at < %(window_end)s
  AND (instance_id IN (SELECT json_array_elements_text(%(shard_instances)s::json))
       OR (%(owns_unknown)s
           AND (instance_id IS NULL
                OR instance_id NOT IN (
                  SELECT json_array_elements_text(%(known_instances)s::json)))))
