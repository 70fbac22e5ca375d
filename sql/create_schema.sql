-- Create a schema unless it exists. Tables: {schema} (a quoted schema name).
CREATE SCHEMA IF NOT EXISTS {schema}
