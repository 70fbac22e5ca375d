-- The columns of one table of the Eunomia source file (DuckDB, through the duckdb driver: its named
-- parameter $table, not a SQLAlchemy bind).
SELECT column_name, data_type FROM duckdb_columns()
WHERE database_name = current_database() AND schema_name = 'main' AND table_name = $table
ORDER BY column_index
