-- CDM check (validate plausibleBeforeDeath): rows dated more than :slack_days days after the person's
-- (latest) death date. Binds: :slack_days. Tables: {table}, {death}; column: {date_column}.
SELECT count(*)
FROM {table} e
JOIN (SELECT person_id, max(death_date) AS death_date FROM {death} GROUP BY person_id) d
  ON d.person_id = e.person_id
WHERE e.{date_column} > d.death_date + CAST(:slack_days AS INTEGER)
