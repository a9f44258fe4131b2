-- Control-plane schema (DESIGN §2). tally only reads these tables in production;
-- demo and tests create them from this file.
CREATE TABLE organizations (
  org_id text PRIMARY KEY,
  name text NOT NULL,
  billing_email text,
  plan text NOT NULL,                 -- 'free-tier' | 'base-plus-usage' | 'usage-only'
  provider text NOT NULL,             -- 'stripe' | 'polar'
  provider_customer_id text,          -- Stripe 'cus_…'; for Polar the external customer id
  created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE throttle_settings (      -- optional row per org; defaults below
  org_id text PRIMARY KEY REFERENCES organizations,
  continuous_limit_minutes int NOT NULL DEFAULT 480,
  daily_limit_minutes int NOT NULL DEFAULT 1440,
  idle_timeout_minutes int NOT NULL DEFAULT 30
);
CREATE TABLE instances (
  instance_id text PRIMARY KEY,
  org_id text NOT NULL REFERENCES organizations,
  tier text NOT NULL,                 -- 'small' | 'medium' | 'large' | 'gpu'
  status text NOT NULL,               -- 'running' | 'paused' | 'stopped'
  created_at timestamptz NOT NULL,
  stopped_at timestamptz,
  last_heartbeat timestamptz
);
CREATE TABLE heartbeats (             -- append-only, written by instances; not trusted
  instance_id text,
  sent_at timestamptz,
  active boolean,                     -- user activity since the previous heartbeat
  received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX heartbeats_sent_at ON heartbeats (sent_at);
CREATE TABLE usage_counters (         -- the control plane's own running tally
  org_id text NOT NULL,
  usage_date date NOT NULL,
  tier text NOT NULL,
  runtime_seconds bigint NOT NULL,
  last_reconciled_at timestamptz,
  updated_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, usage_date, tier)
);
