-- tally doctor: which providers the orgs use (each needs its key), with how many orgs.
SELECT provider, count(*) AS orgs
FROM organizations
WHERE provider IS NOT NULL
GROUP BY provider
ORDER BY provider
