-- Reconciliation (DESIGN §8) and credits (DESIGN §4).

-- What each provider recorded for a usage day, per (org, tier). `exact`: read for
-- this customer alone; false: inferred from a Polar group total that equalled the
-- ledger (the group was not split further because nothing differed).
CREATE TABLE billing.provider_usage (
  usage_date date NOT NULL,
  org_id text NOT NULL,
  tier text NOT NULL,
  provider text NOT NULL,
  customer_id text NOT NULL,
  seconds bigint NOT NULL,
  exact boolean NOT NULL,
  read_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (usage_date, org_id, tier)
);

-- One row per (day, provider) that provider_usage looked at: whether it could read
-- it at all ('read', 'not_configured', 'no_customers') and which tiers it could not.
CREATE TABLE billing.provider_reads (
  usage_date date NOT NULL,
  provider text NOT NULL,
  status text NOT NULL CHECK (status IN ('read', 'not_configured', 'no_customers')),
  customers int NOT NULL DEFAULT 0,
  calls int NOT NULL DEFAULT 0,
  unread_tiers text[] NOT NULL DEFAULT '{}',
  unattributed_seconds bigint NOT NULL DEFAULT 0,
  note text,
  read_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (usage_date, provider)
);

-- The provider's subscription plan per org as read with the day's usage.
CREATE TABLE billing.provider_plans (
  usage_date date NOT NULL,
  org_id text NOT NULL,
  provider text NOT NULL,
  customer_id text NOT NULL,
  plan text,
  status text,
  read_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (usage_date, org_id)
);

CREATE TABLE billing.discrepancies (
  discrepancy_id bigserial PRIMARY KEY,
  usage_date date NOT NULL,
  kind text NOT NULL CHECK (kind IN (
    'unpushed', 'provider_missing', 'provider_under', 'provider_over', 'tier_mismatch',
    'counter_drift', 'missing_counter', 'cap_exceeded', 'push_window_expired',
    'plan_mismatch', 'stuck_instance', 'zombie_instance')),
  org_id text NOT NULL,
  tier text,
  instance_id text,
  provider text,
  billable_seconds bigint,
  sent_seconds bigint,
  provider_seconds bigint,
  counter_seconds bigint,
  delta_seconds bigint NOT NULL,
  -- Signed like delta (provider/counter minus what it should be), list tier rates,
  -- rounded half-up to cents; NULL when there is no rate (unknown tier or plan).
  dollar_impact numeric(14, 2),
  money_moving boolean NOT NULL,
  explained boolean NOT NULL DEFAULT false,
  detail text NOT NULL,
  recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX discrepancies_date ON billing.discrepancies (usage_date, kind);

-- Finance's acknowledgements: a discrepancy matching (day, kind, org, tier) is
-- reported as explained with this text (tier '' matches rows without a tier).
CREATE TABLE billing.discrepancy_explanations (
  usage_date date NOT NULL,
  kind text NOT NULL,
  org_id text NOT NULL,
  tier text NOT NULL DEFAULT '',
  explanation text NOT NULL,
  explained_by text NOT NULL,
  explained_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (usage_date, kind, org_id, tier)
);

ALTER TABLE billing.credit_proposals
  ADD COLUMN customer_id text,
  ADD COLUMN currency text NOT NULL DEFAULT 'usd',
  ADD COLUMN escalation text
    CHECK (escalation IN ('support_agent', 'support_lead', 'vp_engineering', 'engineering')),
  ADD COLUMN systemic boolean NOT NULL DEFAULT false,
  ADD COLUMN approved_by text,
  ADD COLUMN approved_at timestamptz,
  ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now(),
  ADD CONSTRAINT credit_proposals_status_check
    CHECK (status IN ('proposed', 'withdrawn', 'applied', 'manual'));
CREATE INDEX credit_proposals_date ON billing.credit_proposals (usage_date, status);

-- Every credit handed back: who approved it, when, why, how much, and the
-- provider's reference. One per proposal, ever.
CREATE TABLE billing.billing_corrections (
  correction_id bigserial PRIMARY KEY,
  proposal_id bigint NOT NULL UNIQUE REFERENCES billing.credit_proposals (proposal_id),
  org_id text NOT NULL,
  usage_date date NOT NULL,
  tier text NOT NULL,
  provider text NOT NULL,
  customer_id text,
  amount numeric(12, 2) NOT NULL CHECK (amount > 0),
  currency text NOT NULL,
  method text NOT NULL CHECK (method IN ('stripe_balance_transaction', 'manual')),
  provider_reference text,
  reason text NOT NULL,
  approved_by text NOT NULL,
  applied_at timestamptz NOT NULL DEFAULT now()
);
