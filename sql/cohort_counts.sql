-- Persons and records of one cohort. Binds: :id. Tables: {cohort}.
SELECT count(DISTINCT subject_id), count(*) FROM {cohort} WHERE cohort_definition_id = :id
