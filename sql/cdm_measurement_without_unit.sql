-- CDM check (sites check measurement_without_unit, validate valueWithoutUnit): numeric measurements
-- without a unit concept. Tables: {measurement}.
SELECT count(*)
FROM {measurement}
WHERE value_as_number IS NOT NULL AND (unit_concept_id IS NULL OR unit_concept_id = 0)
