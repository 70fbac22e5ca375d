-- The largest CDM version any cdm_source row states. Tables: {cdm_source}.
SELECT max(cdm_version) FROM {cdm_source}
