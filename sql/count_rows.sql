-- Rows of one table. Tables: {table}.
SELECT count(*) FROM {table}
