-- The inclusion-rule names of one cohort. Binds: :id. Tables: {cohort_inclusion}.
SELECT rule_sequence, name FROM {cohort_inclusion} WHERE cohort_definition_id = :id
