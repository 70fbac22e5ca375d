-- CDM check (sites check): events dated outside every observation period. Tables: {table}, {period}; column: {date_column}.
SELECT count(*) FROM {table} e WHERE NOT EXISTS (SELECT 1 FROM {period} o WHERE o.person_id = e.person_id AND e.{date_column} BETWEEN o.observation_period_start_date AND o.observation_period_end_date)
