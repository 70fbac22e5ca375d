-- The first row of a table of the Eunomia source file, with its rowid (a CSV read without its header
-- holds the column names there). Tables: {table}.
SELECT rowid, * FROM {table} ORDER BY rowid LIMIT 1
