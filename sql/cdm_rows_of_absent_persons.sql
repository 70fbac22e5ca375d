-- CDM check (sites check observation_periods_of_absent_persons on observation_period, validate
-- isForeignKey on person_id): rows whose person_id is not in person. A NULL person_id counts as a defect.
-- Tables: {table}, {person}.
SELECT count(*)
FROM {table} e
WHERE NOT EXISTS (SELECT 1 FROM {person} p WHERE p.person_id = e.person_id)
