-- How many heartbeats the day's look-back window holds right now, counted before
-- the window is read: heartbeats appended later are "late" for the day (the
-- heartbeats table is append-only). now() is the control plane's own clock.
SELECT count(*), now()
FROM heartbeats
WHERE sent_at >= %(window_start)s AND sent_at < %(window_end)s
