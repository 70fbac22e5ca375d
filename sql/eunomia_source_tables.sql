-- The tables of the Eunomia source file (DuckDB, read through the duckdb driver).
SELECT table_name FROM duckdb_tables()
WHERE database_name = current_database() AND schema_name = 'main'
ORDER BY table_name
