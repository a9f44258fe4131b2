-- What the ledger says reached each provider for the day, per (org, customer, tier):
-- read-back attributes a customer's usage to its orgs by these amounts.
SELECT org_id, provider, customer_id, tier, sum(quantity)::bigint AS seconds
FROM billing.usage_push_ledger
WHERE usage_date = %(usage_date)s AND status IN ('sent', 'cancel_refused')
GROUP BY org_id, provider, customer_id, tier
