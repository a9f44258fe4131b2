-- Credits applied to one org for usage days of one month.
SELECT proposal_id, usage_date, tier, amount, method, approved_by, applied_at
FROM billing.billing_corrections
WHERE org_id = %(org_id)s
  AND usage_date >= %(month_start)s AND usage_date < %(next_month)s
ORDER BY usage_date, proposal_id
