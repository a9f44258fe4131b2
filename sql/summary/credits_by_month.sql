-- Credit proposals of a date range per month of their usage day and status.
SELECT date_trunc('month', usage_date)::date AS month,
       status,
       count(*) AS proposals,
       coalesce(sum(amount), 0) AS amount
FROM billing.credit_proposals
WHERE usage_date BETWEEN %(start_date)s AND %(end_date)s
GROUP BY 1, 2
ORDER BY 1, 2
