-- One org's discrepancy explanations in one month (`tally explain`), revoked ones too.
SELECT usage_date, kind, tier, explanation, explained_by, explained_at, revoked_at, revoked_by
FROM billing.discrepancy_explanations
WHERE org_id = %(org_id)s
  AND usage_date >= %(month_start)s AND usage_date < %(next_month)s
ORDER BY usage_date, kind, tier
