-- The columns of one table. Binds: :schema, :table.
SELECT column_name FROM information_schema.columns WHERE lower(table_schema) = lower(:schema) AND lower(table_name) = lower(:table)
