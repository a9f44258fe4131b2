INSERT INTO billing.push_refusals (usage_date, org_id, tier, provider, seconds, reason)
VALUES (%(usage_date)s, %(org_id)s, %(tier)s, %(provider)s, %(seconds)s, %(reason)s)
ON CONFLICT (usage_date, org_id, tier) DO UPDATE
SET provider = EXCLUDED.provider, seconds = EXCLUDED.seconds, reason = EXCLUDED.reason,
    recorded_at = now()
