-- CDM check (sites check duplicate_primary_key, validate isPrimaryKey): the number of distinct primary-key
-- values held by more than one row (not the rows involved). NULL is not a key value (validate's isRequired
-- reports NULL keys). Tables: {table}; column: {key}.
SELECT count(*)
FROM (SELECT {key} FROM {table} WHERE {key} IS NOT NULL GROUP BY {key} HAVING count(*) > 1) d
