-- Which of some cohort ids have rows in the cohort table (built by omopfl or not). Binds: :ids (expanding).
-- Tables: {cohort}.
SELECT DISTINCT cohort_definition_id FROM {cohort} WHERE cohort_definition_id IN :ids
