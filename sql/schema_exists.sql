-- Does a schema exist (case-insensitive)? Binds: :schema.
SELECT count(*) FROM information_schema.schemata WHERE lower(schema_name) = lower(:schema)
