-- omopfl's bookkeeping row of one built cohort.
-- Binds: :id, :name, :hash, :translator, :built_at, :persons, :records. Tables: {cohort_definition}.
INSERT INTO {cohort_definition}
    (cohort_definition_id, cohort_name, definition_hash, translator, built_at, person_count, record_count)
VALUES (:id, :name, :hash, :translator, :built_at, :persons, :records)
