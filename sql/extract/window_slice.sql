-- The time slice the next query reads, bound as parameters into session settings:
-- ADBC streams a query as binary COPY in record batches only when it has no
-- parameters, so heartbeats_window.sql reads its bounds from these settings.
SELECT set_config('tally.part_start', $1, false), set_config('tally.part_end', $2, false)
