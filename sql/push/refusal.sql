INSERT INTO billing.push_refusals (usage_date, org_id, tier, provider, seconds, reason, part)
VALUES (%(usage_date)s, %(org_id)s, %(tier)s, %(provider)s, %(seconds)s, %(reason)s, %(part)s)
ON CONFLICT (usage_date, org_id, tier) DO UPDATE
SET provider = EXCLUDED.provider, seconds = EXCLUDED.seconds, reason = EXCLUDED.reason, part = EXCLUDED.part,
    recorded_at = now()
