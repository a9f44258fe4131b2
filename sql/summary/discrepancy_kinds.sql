-- Discrepancies of a date range by kind, with their hours and dollar impact.
SELECT kind,
       count(*) AS found,
       count(*) FILTER (WHERE NOT explained) AS unexplained,
       coalesce(sum(abs(delta_seconds)), 0) AS seconds,
       coalesce(sum(abs(dollar_impact)), 0) AS dollars
FROM billing.discrepancies
WHERE usage_date BETWEEN %(start_date)s AND %(end_date)s
GROUP BY kind
ORDER BY dollars DESC, found DESC, kind
