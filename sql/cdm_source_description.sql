-- The name and description of a CDM's source (first row is used). Tables: {cdm_source}.
SELECT cdm_source_name, source_description FROM {cdm_source}
