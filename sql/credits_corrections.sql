SELECT correction_id, proposal_id, org_id, usage_date, tier, provider, customer_id, amount,
       currency, method, provider_reference, reason, approved_by, applied_at
FROM billing.billing_corrections
WHERE proposal_id = ANY(%(proposal_ids)s)
ORDER BY proposal_id
