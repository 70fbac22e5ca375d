-- CDM check (sites check): numeric measurements without a unit. Tables: {measurement}.
SELECT count(*) FROM {measurement} WHERE value_as_number IS NOT NULL AND (unit_concept_id IS NULL OR unit_concept_id = 0)
