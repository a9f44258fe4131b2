-- What each real metering of a usage day saw of its look-back window (written in
-- the transaction that replaces the day's billed_usage): heartbeats appended to
-- that window afterwards are late, listed by `tally late` and the
-- `no_late_heartbeats` check, and re-run by the `late_heartbeats` sensor.
CREATE TABLE billing.metered_days (
  usage_date date PRIMARY KEY,
  window_start timestamptz NOT NULL,
  window_end timestamptz NOT NULL,
  heartbeats_seen bigint NOT NULL CHECK (heartbeats_seen >= 0),
  counted_at timestamptz NOT NULL,
  run_id text
);
