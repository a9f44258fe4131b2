-- The org shard the next query reads (assets/shards.py), bound into session
-- settings as heartbeats_window_shard.sql needs them: the shard's instance ids, every
-- instance id the extract knows (as JSON arrays) and whether the shard also takes
-- heartbeats of ids no instance has (shard 0 quarantines them).
SELECT set_config('tally.shard_instances', $1, false),
       set_config('tally.known_instances', $2, false),
       set_config('tally.owns_unknown', $3, false)
