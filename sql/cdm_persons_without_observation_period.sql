-- CDM check (sites check persons_without_observation_period, validate measurePersonCompleteness):
-- persons without an observation period. Tables: {person}, {period}.
SELECT count(*) FROM {person} p WHERE NOT EXISTS (SELECT 1 FROM {period} o WHERE o.person_id = p.person_id)
