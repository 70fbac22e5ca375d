-- CDM check (sites check death_before_birth, validate plausibleAfterBirth on death): persons with a death
-- in a year before their year_of_birth (any person row of that person_id; duplicate person rows are the
-- duplicate-key check's concern). Counts distinct persons. Tables: {death}, {person}.
SELECT count(DISTINCT d.person_id)
FROM {death} d
JOIN {person} p ON p.person_id = d.person_id
WHERE EXTRACT(YEAR FROM d.death_date) < p.year_of_birth
