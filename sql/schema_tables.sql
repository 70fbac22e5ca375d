-- The tables and views of a schema. Binds: :schema.
SELECT table_name FROM information_schema.tables WHERE lower(table_schema) = lower(:schema)
