-- Has a real run (not report-only) read the providers for this day?
SELECT EXISTS (
  SELECT 1 FROM billing.provider_reads
  WHERE usage_date = %(usage_date)s AND status <> 'skipped'
    AND (part = %(part)s OR NOT (part = ANY(%(parts)s)))
) AS real
