-- Refresh PostgreSQL's planner statistics of one table (PostgreSQL only). Tables: {table}.
ANALYZE {table}
