-- The CDM version cdm_source states (first row). Tables: {cdm_source}.
SELECT cdm_version FROM {cdm_source} LIMIT 1
