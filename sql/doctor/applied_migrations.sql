-- tally doctor: the migrations applied to the billing database.
SELECT version FROM billing.schema_migrations
