-- CDM check (sites check): rows with no standard concept. Tables: {table}; column: {concept_column}.
SELECT count(*) FROM {table} WHERE {concept_column} = 0 OR {concept_column} IS NULL
