-- Discrepancies of a date range by kind and by whether they move money (the row's
-- own flag: a kind can be informational on a day, e.g. cap_exceeded made of
-- provider_over seconds), with their hours and dollar impact.
SELECT kind,
       money_moving,
       count(*) AS found,
       count(*) FILTER (WHERE NOT explained) AS unexplained,
       coalesce(sum(abs(delta_seconds)), 0) AS seconds,
       coalesce(sum(abs(dollar_impact)), 0) AS dollars
FROM billing.discrepancies
WHERE usage_date BETWEEN %(start_date)s AND %(end_date)s
GROUP BY kind, money_moving
ORDER BY money_moving DESC, dollars DESC, found DESC, kind
