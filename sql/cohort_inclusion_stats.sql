-- Inclusion-rule attrition of one cohort. Binds: :id, :mode. Tables: {cohort_inclusion_stats}.
SELECT rule_sequence, person_count, gain_count, person_total
FROM {cohort_inclusion_stats}
WHERE cohort_definition_id = :id AND mode_id = :mode
ORDER BY rule_sequence
