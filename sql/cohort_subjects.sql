-- The persons of one cohort. Binds: :id. Tables: {cohort}.
SELECT DISTINCT subject_id FROM {cohort} WHERE cohort_definition_id = :id
