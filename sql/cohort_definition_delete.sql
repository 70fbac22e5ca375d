-- Forget omopfl's bookkeeping row of one cohort. Binds: :id. Tables: {cohort_definition}.
DELETE FROM {cohort_definition} WHERE cohort_definition_id = :id
