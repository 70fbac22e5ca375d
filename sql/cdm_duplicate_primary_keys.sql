-- CDM check (sites check): primary-key values held by more than one row. Tables: {table}; column: {key}.
SELECT count(*) FROM (SELECT {key} FROM {table} GROUP BY {key} HAVING count(*) > 1) d
