-- Base and final counts of one cohort (written by CIRCE for cohorts with inclusion rules).
-- Binds: :id, :mode. Tables: {cohort_summary_stats}.
SELECT base_count, final_count FROM {cohort_summary_stats} WHERE cohort_definition_id = :id AND mode_id = :mode
