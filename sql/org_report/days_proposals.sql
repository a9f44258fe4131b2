-- Credit proposals of one org and month, any status.
SELECT proposal_id, usage_date, tier, kind, seconds, amount, status
FROM billing.credit_proposals
WHERE org_id = %(org_id)s
  AND usage_date >= %(month_start)s AND usage_date < %(next_month)s
ORDER BY usage_date, proposal_id
