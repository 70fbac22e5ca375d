"""CDM conformance: OHDSI Data Quality Dashboard-style checks of a site's CDM, run as SQL.

The ``source="cdm"`` checks of validation (:func:`cdm_conformance`); only counts come back.  The checks
`omopfl sites check` (:mod:`omopfl.sites`) runs too are one ``sql/cdm_*.sql`` file each, read by both
commands, so both count the same (issue 15): duplicate primary keys count the key values held by more
than one row; rows with a NULL date or person_id count as outside observation / of absent persons;
concept id 0 or NULL is unmapped; death before birth counts persons.  A per-table scan is generated,
because its parts depend on which columns exist: the row count, NULLs in required columns, and the
row-level shared checks (end before start, unmapped concept, value without unit) by their files' own
conditions (:func:`omopfl.db.sql_row_condition`), so one read of each table serves them all.

CDM (DQD check names where one applies), fatal:

* ``cdmTable`` / ``cdmField``: a table, or a required column of a table, that omopfl or the study
  reads (person, observation_period, concept, concept_ancestor, the study's domain tables,
  measurement, image_occurrence when imaging is on) is absent; for other tables: warning;
* ``isRequired``: NULL in person.person_id / gender_concept_id / year_of_birth or in
  observation_period.person_id / start / end date (every feature depends on them);
* ``isPrimaryKey`` on person: one person on several rows;
* ``personTableNotEmpty``: the person table holds no rows.

CDM, warnings (with counts and percent of the table's rows):

* ``isRequired`` in every other NOT NULL column of person, observation_period, visit_occurrence,
  condition_occurrence, drug_exposure, procedure_occurrence, measurement, observation, death;
* ``isPrimaryKey``: primary-key values held by more than one row (the number of such values, not of
  the rows involved; the definition `omopfl sites check` uses too);
* ``isForeignKey``: rows whose person_id is NULL or not in person;
* ``measurePersonCompleteness``: persons without an observation period;
* ``measureObservationPeriodOverlap``: persons with overlapping or adjacent observation periods;
* ``plausibleAfterBirth``: dates in a year before year_of_birth; on death, the number of persons whose
  death is in a year before the year_of_birth of any of their person rows;
* ``plausibleBeforeDeath``: dates more than 60 days after the death date;
* ``plausibleStartBeforeEnd``: end date before start date;
* ``withinObservationPeriod``: events outside every observation period of their person (a NULL date
  or person_id counts);
* ``standardConceptRecordCompleteness``: rows whose concept id is 0 or NULL (unmapped);
* ``valueWithoutUnit``: measurement value_as_number without a unit concept;
* ``conceptInVocabulary``: concept ids of a study feature absent from the site's vocabulary;
* ``cdmVersion``: the CDM version cannot be told (checked as 5.4).

The duplicate keys and orphan observation periods real CDMs (and Eunomia) have are warnings:
cohort and feature SQL join on person and dates, not on event ids.  A check whose query fails
(e.g. a date stored as text) is reported as failed at its own level, with the driver's error
class only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from omopfl.cdm import CLINICAL_TABLES, EVENT_TABLES, VOCABULARY_TABLES, table_columns
from omopfl.config import SiteConfig
from omopfl.db import (
    describe_driver_error,
    detect_cdm_version,
    existing_tables,
    qualified,
    quote_identifier,
    sql_row_condition,
    sql_text,
)
from omopfl.errors import CdmError, DatabaseError
from omopfl.study import StudyConfig
from omopfl.validation_report import FATAL, WARNING, CheckResult

__all__ = ["cdm_conformance", "check_cdm"]

DEATH_SLACK_DAYS = 60  # DQD's plausibleBeforeDeath allows events up to 60 days after death
# Tables omopfl itself cannot work without (cohorts need the vocabulary hierarchy).
CORE_TABLES = ("person", "observation_period", "concept", "concept_ancestor")
# Required fields whose NULLs are fatal: every feature depends on them.
FATAL_REQUIRED_FIELDS = {
    ("person", "person_id"), ("person", "gender_concept_id"), ("person", "year_of_birth"),
    ("observation_period", "person_id"), ("observation_period", "observation_period_start_date"),
    ("observation_period", "observation_period_end_date"),
}


class _Sql:
    """Runs count queries; a failing query becomes a failed check instead of an exception.

    On PostgreSQL each query runs in a savepoint.  DuckDB has no savepoints: a failed query
    aborts the transaction, which is rolled back when it was ours (started by these checks);
    inside a caller's transaction the failure is raised as DatabaseError.
    """

    def __init__(self, conn: sa.Connection) -> None:
        self.conn = conn
        self.postgres = conn.dialect.name == "postgresql"
        self.owns_transaction = not conn.in_transaction()

    def _run(self, query: str | sa.TextClause, params: dict[str, Any] | None, fetch: Callable[[Any], Any]) -> Any:
        """``fetch(result)`` of the query, or a safe reason (str) why it failed."""
        statement = sa.text(query) if isinstance(query, str) else query
        try:
            if self.postgres:
                with self.conn.begin_nested():
                    return fetch(self.conn.execute(statement, params or {}))
            return fetch(self.conn.execute(statement, params or {}))
        except sa.exc.DBAPIError as exc:
            reason = describe_driver_error(exc)
            if not self.postgres:
                if not self.owns_transaction:
                    raise DatabaseError(f"CDM conformance check failed ({reason})") from None
                self.conn.rollback()
            return reason

    def row(self, query: str | sa.TextClause, params: dict[str, Any] | None = None) -> tuple[int, ...] | str:
        """The first row as ints (NULL -> 0), or a safe reason why the query failed."""
        row = self._run(query, params, lambda result: result.one())
        return row if isinstance(row, str) else tuple(int(value or 0) for value in row)

    def ints(self, query: str | sa.TextClause, params: dict[str, Any] | None = None) -> set[int] | str:
        """Every value of the first column as ints, or a safe reason why the query failed."""
        values = self._run(query, params, lambda result: result.scalars().all())
        return values if isinstance(values, str) else {int(v) for v in values if v is not None}


def _study_concepts(sql: _Sql, site: SiteConfig, study: StudyConfig) -> list[CheckResult]:
    """A warning per study feature listing concept ids absent from the site's vocabulary.

    Such a feature is 0 (or missing) for everyone at this site: vocabularies differ between sites, so this
    is not fatal, but it must not pass silently.
    """
    features = [(f.name, f.concepts) for f in study.concept_sets] + [(m.name, m.concepts) for m in study.measurements]
    features += [(c.name, c.concepts) for c in study.categoricals]
    ids = sorted({int(c) for _, concepts in features for c in concepts})  # ints checked by the study parser
    if not ids:
        return []
    query = sa.text(sql_text("known_concept_ids", concept=qualified(site.vocabulary_schema, "concept")))
    known = sql.ints(query.bindparams(sa.bindparam("ids", expanding=True)), {"ids": ids})
    results = []
    for name, concepts in features:
        if isinstance(known, str):
            results.append(CheckResult("cdm", "conceptInVocabulary", "concept", name, WARNING, False, None,
                                       len(concepts), None, f"concept ids of feature {name} could not be "
                                       f"checked ({known})"))
            continue
        unknown = [c for c in concepts if c not in known]
        listed = ", ".join(str(c) for c in unknown[:10]) + (", ..." if len(unknown) > 10 else "")
        description = (f"feature {name}: concept id(s) {listed} not in the vocabulary of site {site.name}"
                       + (" (the feature is empty at this site)" if len(unknown) == len(concepts) else "")
                       if unknown else f"feature {name}: every concept id is in the vocabulary")
        results.append(CheckResult("cdm", "conceptInVocabulary", "concept", name, WARNING, not unknown,
                                   len(unknown), len(concepts), 0.0, description))
    return results


def _columns_in_schema(conn: sa.Connection, schema: str) -> dict[str, set[str]]:
    rows = conn.execute(sa.text(sql_text("schema_columns")), {"schema": schema})
    out: dict[str, set[str]] = {}
    for table, column in rows:
        out.setdefault(table, set()).add(column)
    return out


def _needed_tables(study: StudyConfig | None) -> set[str]:
    needed = set(CORE_TABLES)
    if study is not None:
        needed |= {table for table in study.tables_read() if table != "specimen"}
    return needed


def cdm_conformance(
    conn: sa.Connection, site: SiteConfig, cdm_version: str | None = None, *, study: StudyConfig | None = None
) -> list[CheckResult]:
    """Data Quality Dashboard-style checks of a site's CDM, run as SQL; only counts come back.

    Parameters
    ----------
    conn:
        Open connection to the site's database (read access to the CDM is enough).
    site:
        The site's configuration (CDM and vocabulary schemas).
    cdm_version:
        "5.4" or "5.3"; None detects it (5.4 when it cannot be told, with a warning).
    study:
        When given, the tables the study reads are needed: their absence is fatal.

    Returns
    -------
    list[CheckResult]
        One result per check run, passed or failed (see the module docstring for levels).
        A missing schema or table is a result, not an exception.
    """
    return check_cdm(conn, site, cdm_version, study=study)[1]


def check_cdm(
    conn: sa.Connection, site: SiteConfig, cdm_version: str | None = None, *, study: StudyConfig | None = None
) -> tuple[str, list[CheckResult]]:
    """:func:`cdm_conformance`, and the CDM version checked against ("5.4" or "5.3")."""
    sql = _Sql(conn)  # first: it notes whether the transaction is the caller's
    results: list[CheckResult] = []
    cdm = site.cdm_schema

    def add(check: str, table: str, field: str | None, level: str, violated: int | None, total: int | None,
            description: str, passed: bool | None = None) -> None:
        if passed is None:
            passed = violated == 0
        threshold = 0.0 if violated is not None else None
        results.append(CheckResult("cdm", check, table, field, level, passed, violated, total, threshold, description))

    if cdm_version is None:
        try:
            cdm_version = detect_cdm_version(conn, cdm)
        except CdmError:
            cdm_version = "5.4"
            add("cdmVersion", "cdm_source", "cdm_version", WARNING, None, None,
                "CDM version cannot be told; checked as 5.4", passed=False)
    version = "5.3" if str(cdm_version).startswith("5.3") else "5.4"
    needed = _needed_tables(study)

    tables = existing_tables(conn, cdm)
    vocab_tables = tables if site.vocabulary_schema == cdm else existing_tables(conn, site.vocabulary_schema)
    columns = _columns_in_schema(conn, cdm)
    for table in (*CLINICAL_TABLES, *VOCABULARY_TABLES):
        there = table in (vocab_tables if table in VOCABULARY_TABLES else tables)
        if not there and study is not None and table not in needed:
            continue  # a table the study never reads: its absence is no concern of the study's
        add("cdmTable", table, None, FATAL if table in needed else WARNING, None, None,
            "table absent from the CDM" if not there else "table present", passed=there)

    checked = [t for t in ("person", "observation_period", *EVENT_TABLES, "death") if t in tables]
    usable: dict[str, set[str]] = {}  # table -> columns present
    for table in checked:
        present = columns.get(table, set())
        usable[table] = present
        for spec in table_columns(table, version):
            if spec.required:
                there = spec.name in present
                add("cdmField", table, spec.name, FATAL if table in needed else WARNING, None, None,
                    "required column absent" if not there else "required column present", passed=there)

    def has(table: str, *names: str | None) -> bool:
        return table in usable and all(n is not None and n in usable[table] for n in names)

    def q(name: str) -> str:
        return quote_identifier(name)

    person = qualified(cdm, "person")
    period = qualified(cdm, "observation_period")
    totals: dict[str, int] = {}

    # One scan per table: its row count, the NULLs in its required columns, and the row-level checks
    # `omopfl sites check` runs too, each by its sql/ file's own condition (db.sql_row_condition).  The scan
    # is generated: its parts depend on which columns exist.  Should the combined query fail (a column of
    # an unexpected type), each part runs on its own.
    for table in checked:
        target = qualified(cdm, table)
        parts: list[tuple[str, str, str, str, str]] = []  # check, field, level, condition, description
        for spec in table_columns(table, version):
            if spec.required and spec.name in usable[table]:
                level = FATAL if (table, spec.name) in FATAL_REQUIRED_FIELDS else WARNING
                parts.append(("isRequired", spec.name, level, f"{q(spec.name)} IS NULL", "NULL in a required column"))
        start, end, concept = EVENT_TABLES.get(table, (None, None, None))
        if table == "observation_period":
            start, end = "observation_period_start_date", "observation_period_end_date"
        if has(table, start, end):
            parts.append(("plausibleStartBeforeEnd", start, WARNING,
                          sql_row_condition("cdm_end_before_start", table=target, start=q(start), end=q(end)),
                          f"{end} before {start}"))
        if has(table, concept):
            parts.append(("standardConceptRecordCompleteness", concept, WARNING,
                          sql_row_condition("cdm_unmapped_concept", table=target, concept_column=q(concept)),
                          f"{concept} is 0 or NULL (no standard concept)"))
        if table == "measurement" and has(table, "value_as_number", "unit_concept_id"):
            parts.append(("valueWithoutUnit", "unit_concept_id", WARNING,
                          sql_row_condition("cdm_measurement_without_unit", measurement=target),
                          "value_as_number without a unit"))
        sums = [f"sum(CASE WHEN {condition} THEN 1 ELSE 0 END)" for _, _, _, condition, _ in parts]
        row = sql.row(f"SELECT {', '.join(['count(*)', *sums])} FROM {target}")
        if isinstance(row, str):
            total_row = sql.row(sql_text("count_rows", table=target))
            if isinstance(total_row, str):
                add("cdmTable", table, None, FATAL if table in needed else WARNING,
                    None, None, f"table present but could not be read ({total_row})", passed=False)
                continue
            values: list[int | str] = [total_row[0]]
            for expression in sums:
                part = sql.row(f"SELECT {expression} FROM {target}")
                values.append(part if isinstance(part, str) else part[0])
        else:
            values = list(row)
        total = int(values[0])
        totals[table] = total
        for (check, field, level, _, description), value in zip(parts, values[1:], strict=True):
            if isinstance(value, str):
                add(check, table, field, level, None, total, f"{description}: could not run ({value})", passed=False)
            else:
                add(check, table, field, level, value, total, description)

    if "person" in totals:
        empty = totals["person"] == 0
        add("personTableNotEmpty", "person", None, FATAL, None, totals["person"],
            "person table holds no rows: load the CDM's persons" if empty else "person table holds rows",
            passed=not empty)
    if study is not None and "concept" in vocab_tables:
        results.extend(_study_concepts(sql, site, study))

    def count(check: str, table: str, field: str | None, level: str, query: str, description: str,
              total: int | None = None, params: dict[str, Any] | None = None) -> None:
        row = sql.row(query, params)
        total = total if total is not None else totals.get(table)
        if isinstance(row, str):
            add(check, table, field, level, None, total, f"{description}: could not run ({row})", passed=False)
        else:
            add(check, table, field, level, row[0], total, description)

    # Primary keys: the number of key values held by more than one row.
    for table in checked:
        if table not in totals:
            continue
        for spec in table_columns(table, version):
            if spec.primary_key and has(table, spec.name):
                count("isPrimaryKey", table, spec.name, FATAL if table == "person" else WARNING,
                      sql_text("cdm_duplicate_primary_keys", table=qualified(cdm, table), key=q(spec.name)),
                      "primary-key values held by more than one row")

    person_ok = "person" in totals and has("person", "person_id")
    period_ok = "observation_period" in totals and has(
        "observation_period", "person_id", "observation_period_start_date", "observation_period_end_date")
    death_ok = "death" in totals and has("death", "person_id", "death_date")
    births_ok = person_ok and has("person", "year_of_birth")

    # Person-level: foreign keys, observation period coverage and overlap, dates against birth and death.
    dated: list[tuple[str, str]] = [("observation_period", "observation_period_start_date")]
    dated += [(t, spec[0]) for t, spec in EVENT_TABLES.items()]
    dated.append(("death", "death_date"))
    for table in ("observation_period", *EVENT_TABLES, "death"):
        if table not in totals or not has(table, "person_id") or not person_ok:
            continue
        count("isForeignKey", table, "person_id", WARNING,
              sql_text("cdm_rows_of_absent_persons", table=qualified(cdm, table), person=person),
              "person_id NULL or not in person")
    if person_ok and period_ok:
        count("measurePersonCompleteness", "observation_period", None, WARNING,
              sql_text("cdm_persons_without_observation_period", person=person, period=period),
              "persons without an observation period", total=totals["person"])
    if period_ok:
        count("measureObservationPeriodOverlap", "observation_period", None, WARNING,
              sql_text("cdm_observation_period_overlap", period=period),
              "persons with overlapping or adjacent observation periods",
              total=totals.get("person", totals["observation_period"]))
    for table, date_column in dated:
        if table not in totals or not has(table, "person_id", date_column):
            continue
        target, column = qualified(cdm, table), q(date_column)
        if births_ok and table == "death":
            count("plausibleAfterBirth", table, date_column, WARNING,
                  sql_text("cdm_death_before_birth", death=target, person=person),
                  "persons whose death is in a year before their year_of_birth")
        elif births_ok:
            count("plausibleAfterBirth", table, date_column, WARNING,
                  sql_text("cdm_dates_before_birth", table=target, person=person, date_column=column),
                  "date in a year before year_of_birth")
        if death_ok and table != "death":
            count("plausibleBeforeDeath", table, date_column, WARNING,
                  sql_text("cdm_dates_after_death", table=target, death=qualified(cdm, "death"), date_column=column),
                  f"date more than {DEATH_SLACK_DAYS} days after death", params={"slack_days": DEATH_SLACK_DAYS})
        if period_ok and table in EVENT_TABLES:
            count("withinObservationPeriod", table, date_column, WARNING,
                  sql_text("cdm_events_outside_observation", table=target, period=period, date_column=column),
                  "event outside every observation period of its person (or without a date or person)")
    return version, results
