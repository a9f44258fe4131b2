COPY billing.quota_usage (org_id, usage_date, month, plan, included_seconds, billable_seconds,
  included_used_seconds, included_left_seconds, overage_seconds, used_pct, base_fee,
  overage_charges, expected_charges, free_tier_overage) FROM STDIN
