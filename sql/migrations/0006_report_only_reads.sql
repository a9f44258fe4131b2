-- Report-only runs contact no provider: their read record says so.
ALTER TABLE billing.provider_reads DROP CONSTRAINT provider_reads_status_check;
ALTER TABLE billing.provider_reads ADD CONSTRAINT provider_reads_status_check
  CHECK (status IN ('read', 'not_configured', 'no_customers', 'skipped'));
