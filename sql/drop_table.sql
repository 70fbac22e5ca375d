-- Drop one table. Tables: {table}.
DROP TABLE {table}
