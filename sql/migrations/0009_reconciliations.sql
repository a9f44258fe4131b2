-- Each real reconciliation of a usage day (DESIGN §9), written in the same
-- transaction as the day's discrepancies: freshness, `tally status` and `tally
-- metrics` read this, never whichever Dagster home is local. Report-only runs
-- write nothing here. A step retried inside one run updates its row.
CREATE TABLE billing.reconciliations (
  usage_date date NOT NULL,
  run_id text NOT NULL,
  run_started_at timestamptz NOT NULL,
  reconciled_at timestamptz NOT NULL,
  PRIMARY KEY (usage_date, run_id)
);
CREATE INDEX reconciliations_latest ON billing.reconciliations (reconciled_at DESC);
