-- One org's discrepancies in one month, each row as JSON (columns beyond
-- usage_date, kind, org_id, tier belong to the reconciliation stage).
SELECT to_jsonb(d) AS detail
FROM billing.discrepancies d
WHERE d.org_id = %(org_id)s
  AND d.usage_date >= %(month_start)s AND d.usage_date < %(next_month)s
ORDER BY d.usage_date, d.kind
