-- tally doctor: which of the control-plane tables tally reads do not exist.
SELECT name
FROM unnest(CAST(:tables AS text[])) AS name
WHERE to_regclass(name) IS NULL
ORDER BY name
