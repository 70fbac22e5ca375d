-- The comment on a table (PostgreSQL). Binds: :table (the quoted, schema-qualified name).
SELECT obj_description(to_regclass(:table), 'pg_class')
