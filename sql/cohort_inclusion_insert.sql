-- One inclusion-rule name of a cohort. Binds: :id, :seq, :name, :description. Tables: {cohort_inclusion}.
INSERT INTO {cohort_inclusion} (cohort_definition_id, rule_sequence, name, description)
VALUES (:id, :seq, :name, :description)
