-- Active explanations of one (day, kind, org), every tier unless one is named.
SELECT tier
FROM billing.discrepancy_explanations
WHERE usage_date = %(usage_date)s AND kind = %(kind)s AND org_id = %(org_id)s
  AND (%(tier)s::text IS NULL OR tier = %(tier)s) AND revoked_at IS NULL
ORDER BY tier
