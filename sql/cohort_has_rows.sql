-- Does the cohort table hold rows of one cohort? Binds: :id. Tables: {cohort}.
SELECT 1 FROM {cohort} WHERE cohort_definition_id = :id LIMIT 1
