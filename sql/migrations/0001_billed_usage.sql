-- Metering output (DESIGN §3.7) and quarantined heartbeats, one set per usage day.
CREATE TABLE billing.billed_usage (
  org_id text NOT NULL,
  usage_date date NOT NULL,
  tier text NOT NULL,
  runtime_seconds bigint NOT NULL CHECK (runtime_seconds >= 0),
  idle_paused_seconds bigint NOT NULL CHECK (idle_paused_seconds >= 0),
  over_continuous_seconds bigint NOT NULL CHECK (over_continuous_seconds >= 0),
  over_daily_seconds bigint NOT NULL CHECK (over_daily_seconds >= 0),
  billable_seconds bigint NOT NULL CHECK (billable_seconds >= 0),
  computed_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, usage_date, tier),
  CHECK (runtime_seconds = idle_paused_seconds + over_continuous_seconds
                           + over_daily_seconds + billable_seconds)
);
CREATE INDEX billed_usage_date ON billing.billed_usage (usage_date);

CREATE TABLE billing.quarantine (
  usage_date date NOT NULL,
  instance_id text,
  sent_at timestamptz,
  active boolean,
  received_at timestamptz,
  reason text NOT NULL,
  quarantined_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX quarantine_date ON billing.quarantine (usage_date);
