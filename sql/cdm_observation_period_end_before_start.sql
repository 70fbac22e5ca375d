-- CDM check (sites check): observation periods that end before they start. Tables: {period}.
SELECT count(*) FROM {period} WHERE observation_period_end_date < observation_period_start_date
