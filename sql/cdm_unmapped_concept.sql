-- CDM check (sites check unmapped_concept, validate standardConceptRecordCompleteness): rows with no
-- standard concept: concept id 0 or NULL. Tables: {table}; column: {concept_column}.
SELECT count(*) FROM {table} WHERE {concept_column} = 0 OR {concept_column} IS NULL
