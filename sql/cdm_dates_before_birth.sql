-- CDM check (validate plausibleAfterBirth on tables other than death): rows dated in a year before the
-- person's year_of_birth (the smallest, should person rows repeat). Tables: {table}, {person}; column: {date_column}.
SELECT count(*)
FROM {table} e
JOIN (SELECT person_id, min(year_of_birth) AS year_of_birth FROM {person} GROUP BY person_id) b
  ON b.person_id = e.person_id
WHERE EXTRACT(YEAR FROM e.{date_column}) < b.year_of_birth
