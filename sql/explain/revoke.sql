-- Withdraw an active explanation; returns what it said, to take it off the rows.
UPDATE billing.discrepancy_explanations
SET revoked_at = now(), revoked_by = %(revoked_by)s
WHERE usage_date = %(usage_date)s AND kind = %(kind)s AND org_id = %(org_id)s
  AND tier = %(tier)s AND revoked_at IS NULL
RETURNING explanation, explained_by
