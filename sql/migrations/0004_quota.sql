-- Month-to-date quota per org as of each usage day (DESIGN §4 quota_usage), written
-- delete-then-insert per usage_date. Seconds are exact; hours = seconds / 3600.
CREATE TABLE billing.quota_usage (
  org_id text NOT NULL,
  usage_date date NOT NULL,            -- month to date up to and including this day
  month date NOT NULL,                 -- first day of usage_date's month
  plan text NOT NULL,
  included_seconds bigint NOT NULL CHECK (included_seconds >= 0),
  billable_seconds bigint NOT NULL CHECK (billable_seconds >= 0),
  included_used_seconds bigint NOT NULL CHECK (included_used_seconds >= 0),
  included_left_seconds bigint NOT NULL CHECK (included_left_seconds >= 0),
  overage_seconds bigint NOT NULL CHECK (overage_seconds >= 0),
  used_pct numeric(12, 2),             -- billable / included × 100; NULL without included hours
  base_fee numeric(12, 2) NOT NULL,
  overage_charges numeric(12, 2) NOT NULL,   -- 0 when the plan does not bill overage
  expected_charges numeric(12, 2) NOT NULL,  -- base fee + overage, half-up to cents
  free_tier_overage boolean NOT NULL,        -- overage on a plan that does not bill it
  computed_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, usage_date),
  CHECK (included_used_seconds + included_left_seconds = included_seconds),
  CHECK (included_used_seconds + overage_seconds = billable_seconds)
);
CREATE INDEX quota_usage_date ON billing.quota_usage (usage_date);

-- The same, per tier: where the included hours went and what the overage costs.
CREATE TABLE billing.quota_usage_tiers (
  org_id text NOT NULL,
  usage_date date NOT NULL,
  tier text NOT NULL,
  billable_seconds bigint NOT NULL CHECK (billable_seconds >= 0),
  included_seconds bigint NOT NULL CHECK (included_seconds >= 0),
  overage_seconds bigint NOT NULL CHECK (overage_seconds >= 0),
  overage_amount numeric(12, 2) NOT NULL,    -- at the tier rate, whether billed or not
  PRIMARY KEY (org_id, usage_date, tier),
  CHECK (included_seconds + overage_seconds = billable_seconds)
);
CREATE INDEX quota_usage_tiers_date ON billing.quota_usage_tiers (usage_date);

-- Budget alerts: one row per (org, month, threshold), ever. A row is written
-- (queued) before anything is sent and marked pending in its own committed
-- transaction right before the SMTP hand-off, so a crash leaves evidence and is
-- never sent twice. See docs/quota.md for the state machine.
CREATE TABLE billing.budget_alert_ledger (
  org_id text NOT NULL,
  month date NOT NULL,
  threshold int NOT NULL CHECK (threshold > 0 AND threshold <= 100),
  status text NOT NULL CHECK (status IN ('queued', 'pending', 'sent', 'failed', 'interrupted',
                                         'not_mailed', 'no_address', 'expired', 'superseded')),
  usage_date date NOT NULL,            -- the day whose month to date crossed the threshold
  billable_seconds bigint NOT NULL,    -- month to date on that day
  included_seconds bigint NOT NULL CHECK (included_seconds > 0),
  recipient text,
  attempts int NOT NULL DEFAULT 0,
  last_error text,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(),
  sent_at timestamptz,
  PRIMARY KEY (org_id, month, threshold)
);
CREATE INDEX budget_alert_ledger_open ON billing.budget_alert_ledger (status)
  WHERE status IN ('queued', 'pending', 'failed');
