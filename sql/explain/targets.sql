-- The discrepancies an explanation would cover: one (day, kind, org), every tier
-- unless one is named ('' is a row without a tier).
SELECT coalesce(tier, '') AS tier, count(*) AS rows, bool_and(explained) AS all_explained
FROM billing.discrepancies
WHERE usage_date = %(usage_date)s AND kind = %(kind)s AND org_id = %(org_id)s
  AND (%(tier)s::text IS NULL OR coalesce(tier, '') = %(tier)s)
GROUP BY 1
ORDER BY 1
