-- CDM check (sites check observation_period_end_before_start on observation_period, validate
-- plausibleStartBeforeEnd on every table with both dates): rows that end before they start. A NULL date
-- is not counted here (isRequired reports it). Tables: {table}; columns: {start}, {end}.
SELECT count(*) FROM {table} WHERE {end} < {start}
