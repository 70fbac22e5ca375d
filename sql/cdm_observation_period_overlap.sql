-- CDM check (validate measureObservationPeriodOverlap): persons with overlapping or adjacent
-- observation periods. Tables: {period}.
SELECT count(DISTINCT person_id)
FROM (
    SELECT person_id, observation_period_start_date AS s,
           lag(observation_period_end_date) OVER (
               PARTITION BY person_id ORDER BY observation_period_start_date, observation_period_end_date
           ) AS previous_end
    FROM {period}
) t
WHERE s <= previous_end + 1
