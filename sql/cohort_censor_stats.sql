-- Persons lost to censoring in one cohort. Binds: :id. Tables: {cohort_censor_stats}.
SELECT lost_count FROM {cohort_censor_stats} WHERE cohort_definition_id = :id
