-- Month to date per org as of one day (quota_usage), with the alerts and the open
-- credit proposals of that month (a credit is shown under its usage day's month).
SELECT q.org_id, q.plan, q.billable_seconds, q.included_seconds, q.overage_seconds,
       q.expected_charges, q.free_tier_overage,
       (SELECT string_agg(a.threshold || '%%', ' ' ORDER BY a.threshold)
          FROM billing.budget_alert_ledger a
         WHERE a.org_id = q.org_id AND a.month = q.month
           AND a.status IN ('sent', 'not_mailed')) AS alerts,
       (SELECT coalesce(sum(c.amount), 0) FROM billing.credit_proposals c
         WHERE c.org_id = q.org_id AND c.status = 'proposed'
           AND c.usage_date >= q.month
           AND c.usage_date < (q.month + interval '1 month')::date) AS proposed_credits
FROM billing.quota_usage q
WHERE q.usage_date = %(usage_date)s
ORDER BY q.expected_charges DESC, q.org_id
