-- Instance ids → small integer codes, so heartbeats can stream as fixed-width binary rows.
CREATE TEMP TABLE tally_instance_codes (instance_id text PRIMARY KEY, code int NOT NULL)
ON COMMIT DROP
