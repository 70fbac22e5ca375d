-- CDM check (sites check): deaths in a year before the year of birth. Tables: {death}, {person}.
SELECT count(*) FROM {death} d JOIN {person} p ON p.person_id = d.person_id WHERE EXTRACT(YEAR FROM d.death_date) < p.year_of_birth
