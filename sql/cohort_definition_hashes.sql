-- The definition hash of every cohort omopfl has built. Tables: {cohort_definition}.
SELECT cohort_definition_id, definition_hash FROM {cohort_definition}
