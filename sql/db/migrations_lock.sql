-- Serialise migrations across processes for the length of the transaction.
SELECT pg_advisory_xact_lock(hashtext('tally.migrations'))
