-- Spend alerts (issue 12): orgs without included hours (usage-only) are alerted when
-- their month-to-date charges reach a dollar threshold of their plan (pricing
-- configuration, `spend_alerts`). One ledger, two kinds: `included_hours` (threshold
-- in percent of included hours, as before) and `spend` (threshold in whole dollars, the
-- month-to-date charges at the crossing in `spend`). Still one e-mail per
-- (org, month, kind, threshold), ever.
ALTER TABLE billing.budget_alert_ledger
  ADD COLUMN kind text NOT NULL DEFAULT 'included_hours'
    CHECK (kind IN ('included_hours', 'spend')),
  ADD COLUMN spend numeric(12, 2),
  DROP CONSTRAINT budget_alert_ledger_threshold_check,
  DROP CONSTRAINT budget_alert_ledger_included_seconds_check,
  DROP CONSTRAINT budget_alert_ledger_pkey,
  ADD CONSTRAINT budget_alert_ledger_threshold_check
    CHECK (threshold > 0 AND (kind = 'spend' OR threshold <= 100)),
  ADD CONSTRAINT budget_alert_ledger_included_seconds_check
    CHECK (kind = 'spend' OR included_seconds > 0),
  ADD CONSTRAINT budget_alert_ledger_spend_check CHECK (kind <> 'spend' OR spend IS NOT NULL),
  ADD PRIMARY KEY (org_id, month, kind, threshold);

-- Alerts recorded while SMTP was unset (not_mailed) are owed once it is configured.
DROP INDEX billing.budget_alert_ledger_open;
CREATE INDEX budget_alert_ledger_open ON billing.budget_alert_ledger (status)
  WHERE status IN ('queued', 'pending', 'failed', 'not_mailed');
