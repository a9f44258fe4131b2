-- Exactly-once usage push (DESIGN §6): one row per event sent (or to be sent).
CREATE TABLE billing.usage_push_ledger (
  org_id text NOT NULL,
  usage_date date NOT NULL,
  tier text NOT NULL,
  seq int NOT NULL,
  provider text NOT NULL,
  customer_id text NOT NULL,
  quantity bigint NOT NULL CHECK (quantity > 0),
  identifier text NOT NULL UNIQUE,
  status text NOT NULL CHECK (status IN ('pending', 'sent', 'failed', 'cancelling', 'cancelled')),
  attempts int NOT NULL DEFAULT 0,
  last_error text,
  created_at timestamptz NOT NULL DEFAULT now(),
  sent_at timestamptz,
  updated_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, usage_date, tier, seq)
);
CREATE INDEX usage_push_ledger_date ON billing.usage_push_ledger (usage_date, status);

-- Usage that could not be pushed, with the reason (no customer id, too old, …).
CREATE TABLE billing.push_refusals (
  usage_date date NOT NULL,
  org_id text NOT NULL,
  tier text NOT NULL,
  provider text,
  seconds bigint NOT NULL,
  reason text NOT NULL,
  recorded_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (usage_date, org_id, tier)
);

-- Over-charges to hand back (negative deltas that can no longer be cancelled;
-- reconciliation adds provider_over). Applied by the issue_credits job.
CREATE TABLE billing.credit_proposals (
  proposal_id bigserial PRIMARY KEY,
  org_id text NOT NULL,
  usage_date date NOT NULL,
  tier text NOT NULL,
  provider text NOT NULL,
  kind text NOT NULL,
  seconds bigint NOT NULL CHECK (seconds > 0),
  amount numeric(12, 2),
  evidence text NOT NULL,
  status text NOT NULL DEFAULT 'proposed',
  created_at timestamptz NOT NULL DEFAULT now(),
  UNIQUE (org_id, usage_date, tier, kind)
);
