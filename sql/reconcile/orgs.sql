-- Orgs with plan, provider and daily limit in seconds (control plane).
SELECT o.org_id, o.plan, o.provider, o.provider_customer_id,
       coalesce(t.daily_limit_minutes::bigint * 60, %(default_daily_limit_s)s) AS daily_limit_s
FROM organizations o
LEFT JOIN throttle_settings t USING (org_id)
ORDER BY o.org_id
