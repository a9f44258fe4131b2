-- What read-back learns about the providers' accounts for a usage day (DESIGN §8):
-- whether each customer tally pushed to exists there (bulk customer lists), and the
-- finalized invoices of those customers with their metered seconds per tier.
CREATE TABLE billing.provider_customers (
  usage_date date NOT NULL,
  provider text NOT NULL,
  customer_id text NOT NULL,
  known boolean NOT NULL,
  PRIMARY KEY (usage_date, provider, customer_id)
);
CREATE TABLE billing.provider_invoices (
  usage_date date NOT NULL,
  provider text NOT NULL,
  customer_id text NOT NULL,
  invoice_id text NOT NULL,
  period_start timestamptz NOT NULL,
  period_end timestamptz NOT NULL,
  finalized_at timestamptz NOT NULL,
  tier text NOT NULL,              -- '' for an invoice without metered lines
  seconds bigint NOT NULL,
  PRIMARY KEY (usage_date, provider, invoice_id, tier)
);
