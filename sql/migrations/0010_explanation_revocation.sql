-- `tally explain --revoke` (issue 12): an explanation withdrawn stays on record with
-- who withdrew it and when; only explanations not revoked explain discrepancies.
ALTER TABLE billing.discrepancy_explanations
  ADD COLUMN revoked_at timestamptz,
  ADD COLUMN revoked_by text;
