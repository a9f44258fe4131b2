-- Rows that explanation explained are unexplained again (its note leaves the detail).
UPDATE billing.discrepancies
SET explained = false,
    detail = replace(detail, %(note)s::text, '')
WHERE usage_date = %(usage_date)s AND kind = %(kind)s AND org_id = %(org_id)s
  AND coalesce(tier, '') = %(tier)s AND explained AND strpos(detail, %(note)s::text) > 0
