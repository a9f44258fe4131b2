-- Usage is kept per (provider, customer) it went to (DESIGN §6, §8): an org that
-- moved provider or customer id has read-back rows at each, and a customer shared
-- by several orgs has one row per org.
ALTER TABLE billing.provider_usage DROP CONSTRAINT provider_usage_pkey;
ALTER TABLE billing.provider_usage
  ADD PRIMARY KEY (usage_date, org_id, tier, provider, customer_id);

-- A cancel the provider refused: the event stands (delivered), its excess is a
-- credit proposal, and it is never cancelled again nor replaced.
ALTER TABLE billing.usage_push_ledger DROP CONSTRAINT usage_push_ledger_status_check;
ALTER TABLE billing.usage_push_ledger ADD CONSTRAINT usage_push_ledger_status_check
  CHECK (status IN ('pending', 'sent', 'failed', 'cancelling', 'cancelled', 'cancel_refused'));

-- The customer a discrepancy is about (the one that received the usage), so a
-- credit goes to the customer that was charged.
ALTER TABLE billing.discrepancies ADD COLUMN customer_id text;
