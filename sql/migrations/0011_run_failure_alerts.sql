-- Run-failure alerts (DESIGN §9): one row per announcement — a failed run of
-- daily_billing / issue_credits, or the recovery when a later run of the same job and
-- day succeeds. The row is written (claimed) before anything is sent, and
-- UNIQUE (run_id, kind) makes a second claim of the same announcement a no-op: a
-- restarted sensor or a repeated tick never announces a run twice.
CREATE TABLE billing.run_failure_alerts (
  alert_id bigserial PRIMARY KEY,
  kind text NOT NULL CHECK (kind IN ('failure', 'recovery')),
  job_name text NOT NULL,
  partition_key text NOT NULL DEFAULT '',  -- the usage day; '' for unpartitioned jobs
  run_id text NOT NULL,
  run_ended_at timestamptz NOT NULL,
  resolves_run_id text,                    -- recovery: the failed run it ends
  step_key text,                           -- failure: the failed step
  error text,                              -- failure: its one-line error (scrubbed)
  dedup_key text NOT NULL,                 -- one incident per job and day (PagerDuty)
  -- pending: claimed, being sent; sent: every configured channel took it; logged: no
  -- channel configured; failed: a channel failed, retried on later ticks.
  status text NOT NULL CHECK (status IN ('pending', 'sent', 'logged', 'failed')),
  channels text[] NOT NULL DEFAULT '{}',   -- channels that took it
  errors text[] NOT NULL DEFAULT '{}',     -- delivery errors of the last attempt
  attempts int NOT NULL DEFAULT 0,
  created_at timestamptz NOT NULL,
  sent_at timestamptz,
  updated_at timestamptz NOT NULL,
  UNIQUE (run_id, kind)
);
CREATE INDEX run_failure_alerts_key
  ON billing.run_failure_alerts (job_name, partition_key, run_ended_at DESC);
