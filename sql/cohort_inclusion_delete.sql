-- Forget the inclusion-rule names of one cohort. Binds: :id. Tables: {cohort_inclusion}.
DELETE FROM {cohort_inclusion} WHERE cohort_definition_id = :id
