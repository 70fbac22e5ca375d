-- CDM check (sites check): observation periods whose person_id is missing from person. Tables: {person}, {period}.
SELECT count(*) FROM {period} o WHERE NOT EXISTS (SELECT 1 FROM {person} p WHERE p.person_id = o.person_id)
