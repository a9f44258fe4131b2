-- The stored discrepancies the explanation covers show as explained now, as the
-- next reconciliation of the day would show them (assets/reconcile.py).
UPDATE billing.discrepancies
SET explained = true,
    detail = detail || '; explained: ' || %(explanation)s::text || ' (' || %(explained_by)s::text || ')'
WHERE usage_date = %(usage_date)s AND kind = %(kind)s AND org_id = %(org_id)s
  AND coalesce(tier, '') = %(tier)s AND NOT explained
