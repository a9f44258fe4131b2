-- Record (or replace, un-revoking) the explanation of one (day, kind, org, tier).
INSERT INTO billing.discrepancy_explanations
  (usage_date, kind, org_id, tier, explanation, explained_by, explained_at)
VALUES (%(usage_date)s, %(kind)s, %(org_id)s, %(tier)s, %(explanation)s, %(explained_by)s, now())
ON CONFLICT (usage_date, kind, org_id, tier) DO UPDATE
SET explanation = EXCLUDED.explanation,
    explained_by = EXCLUDED.explained_by,
    explained_at = EXCLUDED.explained_at,
    revoked_at = NULL,
    revoked_by = NULL
