-- Rows beyond the first for each repeated key value (what a load summary reports; the CDM check
-- cdm_duplicate_primary_keys counts the repeated values instead). Tables: {table}; column: {key}.
SELECT count({key}) - count(DISTINCT {key}) FROM {table}
