-- Credits with authority (issue 12): who approved at which level under which
-- ticket, the amount net of included hours beside the list amount, refusals on
-- record, and the customer's "credit applied" e-mail as a ledger (written with the
-- correction, before anything is sent, so a re-run never mails twice).

ALTER TABLE billing.credit_proposals
  ADD COLUMN net_amount numeric(12, 2) CHECK (net_amount >= 0),
  -- Over-charged seconds that fell inside the org's included hours (worth $0).
  ADD COLUMN included_seconds bigint NOT NULL DEFAULT 0 CHECK (included_seconds >= 0),
  ADD COLUMN approver_level text
    CHECK (approver_level IN ('support_agent', 'support_lead', 'vp_engineering', 'engineering')),
  ADD COLUMN ticket_id text;

ALTER TABLE billing.billing_corrections
  DROP CONSTRAINT billing_corrections_amount_check,
  DROP CONSTRAINT billing_corrections_method_check,
  -- amount is what was handed back: net of included hours, $0 when all of it was
  -- inside them (method included_hours: nothing sent to the provider).
  ADD CONSTRAINT billing_corrections_amount_check CHECK (amount >= 0),
  ADD CONSTRAINT billing_corrections_method_check
    CHECK (method IN ('stripe_balance_transaction', 'manual', 'included_hours')),
  ADD COLUMN list_amount numeric(12, 2),
  ADD COLUMN approver_level text
    CHECK (approver_level IN ('support_agent', 'support_lead', 'vp_engineering', 'engineering')),
  ADD COLUMN ticket_id text,
  -- The customer's e-mail: owed (not sent yet: SMTP unset or not reached), pending
  -- (handed to SMTP; a crash leaves it here and it is never sent again), sent,
  -- failed (the server refused: retried by the next run), no_address, not_needed ($0).
  ADD COLUMN notice_status text NOT NULL DEFAULT 'not_needed'
    CHECK (notice_status IN ('owed', 'pending', 'sent', 'failed', 'no_address', 'not_needed')),
  ADD COLUMN notice_recipient text,
  ADD COLUMN notice_attempts int NOT NULL DEFAULT 0,
  ADD COLUMN notice_error text,
  ADD COLUMN notice_sent_at timestamptz;

-- Every refused approval or payment: nothing was applied; who asked, at which level,
-- for what, and why not.
CREATE TABLE billing.credit_refusals (
  refusal_id bigserial PRIMARY KEY,
  proposal_id bigint NOT NULL REFERENCES billing.credit_proposals (proposal_id),
  approver text NOT NULL,
  approver_level text
    CHECK (approver_level IN ('support_agent', 'support_lead', 'vp_engineering', 'engineering')),
  proposal_level text
    CHECK (proposal_level IN ('support_agent', 'support_lead', 'vp_engineering', 'engineering')),
  net_amount numeric(12, 2),
  ticket_id text,
  reason text NOT NULL
    CHECK (reason IN ('not_on_roster', 'below_level', 'no_ticket', 'provider_not_over')),
  detail text NOT NULL,
  refused_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX credit_refusals_proposal ON billing.credit_refusals (proposal_id);
