-- Freshness alerts (DESIGN §9): one row per change of state (stale / fresh) that
-- on-call is owed an alert for. Retries of a failed delivery update the same row.
CREATE TABLE billing.freshness_alerts (
  alert_id bigserial PRIMARY KEY,
  state text NOT NULL CHECK (state IN ('stale', 'fresh')),
  reasons text[] NOT NULL DEFAULT '{}',
  last_success_at timestamptz,
  newest_day date,
  -- sent: every configured channel took it; logged: no channel configured (recorded
  -- and logged only); failed: a delivery failed, retried on the next sensor tick;
  -- superseded: the state flipped back before the alert could be delivered.
  status text NOT NULL CHECK (status IN ('sent', 'logged', 'failed', 'superseded')),
  channels text[] NOT NULL DEFAULT '{}',   -- channels that took the alert
  errors text[] NOT NULL DEFAULT '{}',     -- delivery errors of the last attempt
  attempts int NOT NULL DEFAULT 1,
  detected_at timestamptz NOT NULL,
  sent_at timestamptz,                     -- set once status is sent / logged
  updated_at timestamptz NOT NULL
);
CREATE INDEX freshness_alerts_detected ON billing.freshness_alerts (detected_at DESC);
