SELECT kind, org_id, tier, explanation, explained_by
FROM billing.discrepancy_explanations
WHERE usage_date = %(usage_date)s AND revoked_at IS NULL
