COPY billing.discrepancies
  (usage_date, kind, org_id, tier, instance_id, provider, customer_id, billable_seconds,
   sent_seconds, provider_seconds, counter_seconds, delta_seconds, dollar_impact,
   money_moving, explained, detail)
FROM STDIN
