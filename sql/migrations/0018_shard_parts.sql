-- Org shards (assets/shards.py): every row a day's metering, push or read-back
-- writes carries the part that wrote it ('all' unsharded, else 'index/count'), so
-- a shard's re-run replaces exactly its own rows. Existing rows are 'all'.
ALTER TABLE billing.billed_usage ADD COLUMN part text NOT NULL DEFAULT 'all';
ALTER TABLE billing.billed_usage_instances ADD COLUMN part text NOT NULL DEFAULT 'all';
ALTER TABLE billing.quarantine ADD COLUMN part text NOT NULL DEFAULT 'all';
ALTER TABLE billing.push_refusals ADD COLUMN part text NOT NULL DEFAULT 'all';
ALTER TABLE billing.provider_usage ADD COLUMN part text NOT NULL DEFAULT 'all';
ALTER TABLE billing.provider_plans ADD COLUMN part text NOT NULL DEFAULT 'all';
ALTER TABLE billing.provider_customers ADD COLUMN part text NOT NULL DEFAULT 'all';
ALTER TABLE billing.provider_invoices ADD COLUMN part text NOT NULL DEFAULT 'all';

-- One read record per provider and part, one metered-window record per part.
ALTER TABLE billing.provider_reads ADD COLUMN part text NOT NULL DEFAULT 'all';
ALTER TABLE billing.provider_reads DROP CONSTRAINT provider_reads_pkey;
ALTER TABLE billing.provider_reads ADD PRIMARY KEY (usage_date, provider, part);
ALTER TABLE billing.metered_days ADD COLUMN part text NOT NULL DEFAULT 'all';
ALTER TABLE billing.metered_days DROP CONSTRAINT metered_days_pkey;
ALTER TABLE billing.metered_days ADD PRIMARY KEY (usage_date, part);
