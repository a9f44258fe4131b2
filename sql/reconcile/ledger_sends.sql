-- Each delivered ledger row of the day with when it was first accepted.
SELECT org_id, tier, provider, customer_id, quantity, sent_at
FROM billing.usage_push_ledger
WHERE usage_date = %(usage_date)s AND status IN ('sent', 'cancel_refused')
