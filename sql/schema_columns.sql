-- Every (table, column) of a schema, lower-cased. Binds: :schema.
SELECT lower(table_name), lower(column_name)
FROM information_schema.columns
WHERE lower(table_schema) = lower(:schema)
