-- tally doctor: has this billing database ever been migrated?
SELECT to_regclass('billing.schema_migrations') IS NOT NULL
