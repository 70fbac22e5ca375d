-- Cohort definitions omopfl has built among some ids. Binds: :ids (expanding). Tables: {cohort_definition}.
SELECT cohort_definition_id, cohort_name FROM {cohort_definition} WHERE cohort_definition_id IN :ids
