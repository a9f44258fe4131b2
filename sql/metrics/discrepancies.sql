SELECT kind, count(*) AS discrepancies
FROM billing.discrepancies
GROUP BY kind
ORDER BY kind
