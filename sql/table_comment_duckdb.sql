-- The comment on a table (DuckDB). Binds: :schema, :table.
SELECT comment FROM duckdb_tables()
WHERE database_name = current_database() AND lower(schema_name) = lower(:schema) AND lower(table_name) = lower(:table)
