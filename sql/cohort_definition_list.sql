-- Every cohort omopfl has built, by id. Tables: {cohort_definition}.
SELECT cohort_definition_id, cohort_name, person_count, record_count, built_at, translator, definition_hash
FROM {cohort_definition}
ORDER BY cohort_definition_id
