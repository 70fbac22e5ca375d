"""`omopfl sites check`: what is in a site's CDM, what is missing, what looks wrong.

All work is done in SQL; only counts come back.  The report is for the site's
own data engineer and is not sent anywhere.  Each check is one ``sql/cdm_*.sql`` file that
``omopfl validate`` (:mod:`omopfl.conformance`) reads too, so both count the same; a finding's
``rows`` is the number of key values for ``duplicate_primary_key`` and of persons for
``death_before_birth``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import sqlalchemy as sa

from omopfl.cdm import CLINICAL_TABLES, EVENT_TABLES, VOCABULARY_TABLES, CdmInfo, inspect_cdm, table_columns
from omopfl.config import SiteConfig
from omopfl.db import qualified, quote_identifier, schema_exists, sql_text

__all__ = ["SiteReport", "Finding", "check_site"]

def _primary_keys(version: str) -> dict[str, str]:
    """Table -> primary-key column of the person-level tables, from omopfl's CDM catalogue."""
    version = "5.3" if str(version).startswith("5.3") else "5.4"
    return {
        table: column.name
        for table in ("person", "observation_period", *EVENT_TABLES)
        for column in table_columns(table, version)
        if column.primary_key
    }


@dataclass
class Finding:
    """One suspicious fact about the CDM: a check name, where, how many rows, and its level."""

    check: str
    table: str
    rows: int
    level: str  # "warning" or "error"
    hint: str


@dataclass
class SiteReport:
    """Result of `omopfl sites check`."""

    site: str
    dialect: str
    cdm_version: str
    row_counts: dict[str, int]
    missing_tables: list[str]
    results_schema_ready: bool
    findings: list[Finding] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def persons(self) -> int:
        return self.row_counts.get("person", 0)


def _count(conn: sa.Connection, sql: str) -> int:
    return int(conn.execute(sa.text(sql)).scalar_one() or 0)


def _findings(conn: sa.Connection, site: SiteConfig, info: CdmInfo) -> list[Finding]:
    cdm = site.cdm_schema
    tables = info.tables
    out: list[Finding] = []

    def add(check: str, table: str, rows: int, level: str, hint: str) -> None:
        if rows:
            out.append(Finding(check, table, rows, level, hint))

    person = qualified(cdm, "person")
    period = qualified(cdm, "observation_period")
    add(
        "persons_without_observation_period", "person",
        _count(conn, sql_text("cdm_persons_without_observation_period", person=person, period=period)),
        "warning", "these persons cannot enter a cohort",
    )
    add(
        "observation_periods_of_absent_persons", "observation_period",
        _count(conn, sql_text("cdm_rows_of_absent_persons", table=period, person=person)),
        "warning", "rows refer to person_ids missing from person",
    )
    add(
        "observation_period_end_before_start", "observation_period",
        _count(conn, sql_text("cdm_end_before_start", table=period,
                              start=quote_identifier("observation_period_start_date"),
                              end=quote_identifier("observation_period_end_date"))),
        "error", "fix the ETL: periods must end on or after they start",
    )
    for table, key in _primary_keys(info.version).items():
        if table not in tables:
            continue
        add(
            "duplicate_primary_key", table,
            _count(conn, sql_text("cdm_duplicate_primary_keys", table=qualified(cdm, table),
                                  key=quote_identifier(key))),
            "warning", f"{key} values occur more than once",
        )
    for table, (date_column, _, concept_column) in EVENT_TABLES.items():
        if table not in tables:
            continue
        target = qualified(cdm, table)
        add(
            "events_outside_observation", table,
            _count(conn, sql_text("cdm_events_outside_observation", table=target, period=period,
                                  date_column=quote_identifier(date_column))),
            "warning", "events outside every observation period are ignored by most cohorts",
        )
        add(
            "unmapped_concept", table,
            _count(conn, sql_text("cdm_unmapped_concept", table=target,
                                  concept_column=quote_identifier(concept_column))),
            "warning", f"{concept_column} is 0 or NULL (no standard concept); these rows match no concept set",
        )
    if "death" in tables:
        add(
            "death_before_birth", "death",
            _count(conn, sql_text("cdm_death_before_birth", death=qualified(cdm, "death"), person=person)),
            "error", "persons whose death is dated in a year before their year of birth",
        )
    if "measurement" in tables:
        add(
            "measurement_without_unit", "measurement",
            _count(conn, sql_text("cdm_measurement_without_unit", measurement=qualified(cdm, "measurement"))),
            "warning", "numeric values without a unit cannot be harmonized",
        )
    concept = qualified(site.vocabulary_schema, "concept")
    if "concept" in tables and _count(conn, sql_text("count_rows", table=concept)) == 0:
        out.append(
            Finding("empty_vocabulary", "concept", 0, "error", "load the OMOP vocabulary into the vocabulary schema")
        )
    return out


def check_site(conn: sa.Connection, site: SiteConfig) -> SiteReport:
    """Inspect a site's CDM on an open connection.

    Raises
    ------
    CdmError
        When the configured schema holds no CDM.
    """
    info = inspect_cdm(conn, site)
    counts: dict[str, int] = {}
    for table in (*CLINICAL_TABLES, *VOCABULARY_TABLES):
        if table not in info.tables:
            continue
        schema = site.vocabulary_schema if table in VOCABULARY_TABLES else site.cdm_schema
        counts[table] = _count(conn, sql_text("count_rows", table=qualified(schema, table)))
    results_ready = schema_exists(conn, site.results_schema)
    findings = _findings(conn, site, info)
    if not results_ready:
        findings.append(
            Finding("results_schema_missing", site.results_schema, 0, "warning",
                    "omopfl creates it on the first cohort build (needs CREATE on the database)")
        )
    for table in info.missing:
        findings.append(Finding("missing_table", table, 0, "warning", "table absent from the CDM"))
    return SiteReport(
        site=site.name,
        dialect=conn.dialect.name,
        cdm_version=info.version,
        row_counts=counts,
        missing_tables=info.missing,
        results_schema_ready=results_ready,
        findings=findings,
    )
