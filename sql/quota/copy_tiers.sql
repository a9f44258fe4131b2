COPY billing.quota_usage_tiers (org_id, usage_date, tier, billable_seconds, included_seconds,
  overage_seconds, overage_amount) FROM STDIN
