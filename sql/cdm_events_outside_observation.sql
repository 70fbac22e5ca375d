-- CDM check (sites check events_outside_observation, validate withinObservationPeriod): event rows not
-- dated inside an observation period of their person. Rows with a NULL date or a NULL person_id count as
-- defects. Tables: {table}, {period}; column: {date_column}.
SELECT count(*)
FROM {table} e
WHERE NOT EXISTS (
    SELECT 1 FROM {period} o
    WHERE o.person_id = e.person_id
      AND e.{date_column} BETWEEN o.observation_period_start_date AND o.observation_period_end_date
)
