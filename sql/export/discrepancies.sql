-- Discrepancies of a date range with the credit proposed for each (runbook export).
SELECT d.usage_date, d.kind, d.org_id, d.tier, d.instance_id, d.provider,
       d.billable_seconds, d.sent_seconds, d.provider_seconds, d.counter_seconds,
       d.delta_seconds, d.dollar_impact, d.money_moving, d.explained, d.detail,
       c.proposal_id AS credit_proposal_id, c.amount AS credit_amount,
       c.status AS credit_status, c.escalation AS credit_escalation, d.recorded_at
FROM billing.discrepancies d
LEFT JOIN billing.credit_proposals c
  ON c.org_id = d.org_id AND c.usage_date = d.usage_date AND c.kind = d.kind
 AND d.tier = ANY (string_to_array(c.tier, '+'))
WHERE d.usage_date BETWEEN %(start_date)s AND %(end_date)s
ORDER BY d.usage_date, d.kind, d.org_id, d.tier NULLS FIRST, d.instance_id NULLS FIRST
