-- CDM check (sites check and validate): persons without an observation period.
-- Tables: {person}, {period}.
SELECT count(*) FROM {person} p WHERE NOT EXISTS (SELECT 1 FROM {period} o WHERE o.person_id = p.person_id)
