-- Heartbeats another day quarantined as `future` whose sent_at falls in this day and
-- that are no longer in the future at this run: this day judges them now (billed or
-- quarantined here), so they leave the other day's quarantine — never both.
DELETE FROM billing.quarantine
WHERE reason = %(reason)s
  AND usage_date <> %(usage_date)s
  AND sent_at >= %(day_start)s AND sent_at < %(day_end)s
  AND sent_at < %(not_future_before)s
  AND (part = %(part)s OR NOT (part = ANY(%(parts)s)))
