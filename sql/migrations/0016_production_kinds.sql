-- Discrepancy kinds for providers as they really behave (DESIGN §8): usage still
-- being processed (provider_settling, WARN), customers the provider does not have,
-- usage pushed after its period's invoice finalized, and finalized invoices whose
-- metered quantities differ from what tally billed for that period.
ALTER TABLE billing.discrepancies DROP CONSTRAINT discrepancies_kind_check;
ALTER TABLE billing.discrepancies ADD CONSTRAINT discrepancies_kind_check CHECK (kind IN (
  'unpushed', 'provider_missing', 'provider_under', 'provider_over', 'provider_settling',
  'tier_mismatch', 'counter_drift', 'missing_counter', 'cap_exceeded',
  'push_window_expired', 'plan_mismatch', 'unknown_customer', 'pushed_after_finalization',
  'invoice_mismatch', 'stuck_instance', 'zombie_instance'));
