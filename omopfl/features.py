"""Features of the target cohort, computed inside the site's database (PostgreSQL or DuckDB).

One query builds one row per target-cohort person (the person's first cohort entry is the
index date) from the cohort table, the CDM and the vocabulary; rows come back in chunks
through a server-side cursor, never the whole table at once.  Nothing here changes the
database.

Columns (the *column spec*, :func:`feature_columns`; each column a :class:`ColumnSpec` with
``name``, ``kind``, ``unit``, ``feature`` and ``levels``), in this order:

============================  ============  ===================================================
column                        kind          value
============================  ============  ===================================================
``person_id``                 id            int64
``index_date``                date          datetime64, first ``cohort_start_date`` of the person
``label``                     label         1 if an outcome cohort entry starts on
                                            ``index + time_at_risk[0] .. index + time_at_risk[1]``
                                            (days, bounds included), else 0
``age``                       numeric "a"   completed years at index from year/month/day of
                                            birth (a missing month or day counts as 1), float64
``sex``                       categorical   ``"male"`` (8507), ``"female"`` (8532), else ``"other"``
``prior_observation_days``    numeric "d"   index minus the start of the observation period
                                            containing index (the earliest if several); NaN if none
<concept set>                 binary/count  events of the concept set (with descendants through
                                            ``concept_ancestor`` if asked) starting in the window
                                            relative to index: presence 0/1 or row count
<measurement>                 numeric unit  value (measurement or observation ``value_as_number``)
                                            in the study's canonical unit, converted in SQL,
                                            ``last`` (latest date, then datetime, row id and value,
                                            all descending), ``mean``, ``min`` or ``max``; NaN if
                                            none; ``count`` (kind count): usable rows, 0 if none
<categorical>                 categorical   level of the last ``value_as_concept_id`` (NULL/0 are no
                                            value) of the concept set in the window: a study level,
                                            ``"other"``, or NULL when none
<measurement>__unknown_unit   unknown_unit  rows in the window whose unit has no conversion
<measurement>__non_finite     non_finite    rows in the window whose value is NaN, +-inf or beyond
                                            ±1e18 (absurd; the same on both backends)
============================  ============  ===================================================

Demographic columns appear only if listed in the study's ``demographics`` (in that order).
Measurement rows with a NULL ``value_as_number`` are ignored.  A declared unitless feature
(``unit = "1"``) uses rows with a NULL or 0 ``unit_concept_id`` or a dimensionless UCUM unit (code
``1`` or an annotation alone, ``{score}``).  The conversion table
(:func:`omopfl.harmonize.conversions_to`) is rendered as a ``VALUES`` CTE and joined through
the ``concept_code`` of ``measurement.unit_concept_id`` in the UCUM vocabulary; a unit concept
whose code matches no entry (or several conflicting ones) is unknown: its rows are not used,
only counted (and :func:`unknown_unit_counts` tells which unit codes they had).

SQL safety: schema names go through :func:`omopfl.db.qualified`, column aliases through
:func:`omopfl.db.quote_identifier` (feature names are validated by the study parser); cohort ids,
windows, unit codes and conversion factors are bound parameters; concept ids, ints from the
parsed study, are inlined only after an integer check.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from omopfl.config import SiteConfig
from omopfl.db import describe_driver_error, qualified, quote_identifier
from omopfl.errors import ConfigError, DatabaseError
from omopfl.harmonize import (
    NO_VALUE,
    NON_FINITE_SUFFIX,
    UNKNOWN_UNIT_SUFFIX,
    ColumnSpec,
    conversions_to,
    feature_columns,
)
from omopfl.study import (
    DOMAIN_TABLES,
    LEVEL_RE,
    OTHER_LEVEL,
    VALUE_TABLES,
    CategoricalFeature,
    ConceptSetFeature,
    MeasurementFeature,
    StudyConfig,
)

__all__ = [
    "ColumnSpec",
    "FeatureFrame",
    "feature_columns",
    "feature_query",
    "stream_features",
    "read_features",
    "unknown_unit_counts",
    "DEFAULT_CHUNK_ROWS",
]

DEFAULT_CHUNK_ROWS = 50_000
_SAFE_UNIT = re.compile(r"^[A-Za-z0-9%/\[\]{}_.*^+\-]{1,64}$")  # UCUM codes that may be inlined as literals
# A measurement value beyond this magnitude (or NaN, +-inf) is counted as non-finite and never used: no
# canonical unit has plausible values near it, and the bound keeps conversion and AVG far from float
# overflow, which PostgreSQL raises as an error (NumericValueOutOfRange) where DuckDB gives inf.  An integer
# literal, so that a NUMERIC column is compared as NUMERIC (a cast to double could itself overflow).
ABSURD_MAGNITUDE = 10**18
_OK, _UNKNOWN_UNIT, _NON_FINITE_VALUE = 0, 1, 2  # status of a measurement row


# --------------------------------------------------------------------------------------------
# SQL building
# --------------------------------------------------------------------------------------------


def _check_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ConfigError(f"{what} must be an integer")
    return int(value)


class _Binds:
    """Bound parameters of one statement, or their literal rendering (for ``COPY (...) TO STDOUT``)."""

    def __init__(self, literal: bool) -> None:
        self.literal = literal
        self.params: dict[str, Any] = {}

    def _bind(self, value: Any, sql_type: str) -> str:
        name = f"p{len(self.params)}"
        self.params[name] = value
        return f"CAST(:{name} AS {sql_type})"

    def int(self, value: Any, what: str, sql_type: str = "INTEGER") -> str:
        value = _check_int(value, what)
        return f"CAST({value} AS {sql_type})" if self.literal else self._bind(value, sql_type)

    def float(self, value: float) -> str:
        value = float(value)
        if not np.isfinite(value):
            raise ConfigError("conversion factors must be finite")
        return f"CAST({value!r} AS DOUBLE PRECISION)" if self.literal else self._bind(value, "DOUBLE PRECISION")

    def unit(self, value: str) -> str:
        if not self.literal:
            return self._bind(value, "VARCHAR")
        if not _SAFE_UNIT.match(value):
            raise ConfigError("a unit code with unusual characters cannot be inlined; use bound parameters")
        return f"'{value}'"


def _concept_ids(concepts: Sequence[int], what: str) -> list[int]:
    """Concept ids checked to be positive ints (so they may be inlined)."""
    ids = [_check_int(c, what) for c in concepts]
    if not ids or any(c <= 0 for c in ids):
        raise ConfigError(f"{what} must be a non-empty list of positive concept ids")
    return ids


def _concepts_cte(name: str, concepts: Sequence[int], descendants: bool, site: SiteConfig, what: str) -> str:
    """``name(concept_id)``: the concepts, and their descendants if asked."""
    ids = _concept_ids(concepts, what)
    values = ", ".join(f"({c})" for c in ids)
    body = f"SELECT v.concept_id FROM (VALUES {values}) AS v(concept_id)"
    if descendants:
        ancestor = qualified(site.vocabulary_schema, "concept_ancestor")
        body += (f" UNION SELECT ca.descendant_concept_id FROM {ancestor} ca"
                 f" WHERE ca.ancestor_concept_id IN ({', '.join(str(c) for c in ids)})")
    return f"{name} AS ({body})"


def _window(b: _Binds, date: str, window: tuple[int, int], what: str) -> str:
    low = b.int(window[0], f"{what} window start")
    high = b.int(window[1], f"{what} window end")
    return f"{date} BETWEEN t.index_date + {low} AND t.index_date + {high}"


def _target_ctes(b: _Binds, site: SiteConfig, target_id: int) -> list[str]:
    cohort = qualified(site.results_schema, "cohort")
    return [
        f"target AS (SELECT c.subject_id AS person_id, MIN(c.cohort_start_date) AS index_date FROM {cohort} c"
        f" WHERE c.cohort_definition_id = {b.int(target_id, 'target cohort id', 'BIGINT')} GROUP BY c.subject_id)"
    ]


def _person_ctes(b: _Binds, site: SiteConfig, study: StudyConfig, outcome_id: int) -> list[str]:
    cdm = site.cdm_schema
    ctes = []
    if {"age", "sex"} & set(study.demographics):
        ctes.append(
            "person_one AS (SELECT person_id, gender_concept_id, year_of_birth, month_of_birth, day_of_birth FROM"
            " (SELECT p.person_id, p.gender_concept_id, p.year_of_birth, p.month_of_birth, p.day_of_birth,"
            " ROW_NUMBER() OVER (PARTITION BY p.person_id ORDER BY p.year_of_birth, p.month_of_birth,"
            " p.day_of_birth, p.gender_concept_id) AS rn"
            f" FROM {qualified(cdm, 'person')} p JOIN target t ON t.person_id = p.person_id) x WHERE rn = 1)"
        )
    if "prior_observation_days" in study.demographics:
        ctes.append(
            "prior_obs AS (SELECT t.person_id, MIN(op.observation_period_start_date) AS obs_start FROM target t"
            f" JOIN {qualified(cdm, 'observation_period')} op ON op.person_id = t.person_id"
            " AND op.observation_period_start_date <= t.index_date AND op.observation_period_end_date >= t.index_date"
            " GROUP BY t.person_id)"
        )
    cohort = qualified(site.results_schema, "cohort")
    ctes.append(
        f"outcome AS (SELECT DISTINCT t.person_id FROM target t JOIN {cohort} o ON o.subject_id = t.person_id"
        f" WHERE o.cohort_definition_id = {b.int(outcome_id, 'outcome cohort id', 'BIGINT')}"
        f" AND {_window(b, 'o.cohort_start_date', study.time_at_risk, 'time at risk')})"
    )
    return ctes


def _concept_set_ctes(b: _Binds, site: SiteConfig, k: int, f: ConceptSetFeature) -> list[str]:
    table, concept_column, date_column = DOMAIN_TABLES[f.domain]
    events = qualified(site.cdm_schema, table)
    return [
        _concepts_cte(f"cs{k}_concepts", f.concepts, f.descendants, site, f"concept set {f.name}"),
        f"cs{k} AS (SELECT t.person_id, COUNT(*) AS n FROM target t"
        f" JOIN {events} e ON e.person_id = t.person_id"
        f" JOIN cs{k}_concepts k ON k.concept_id = e.{quote_identifier(concept_column)}"
        f" WHERE {_window(b, 'e.' + quote_identifier(date_column), f.window, f.name)} GROUP BY t.person_id)",
    ]


def _unit_ids_cte(b: _Binds, site: SiteConfig, k: int, m: MeasurementFeature) -> list[str]:
    """``m{k}_unit_ids(concept_id, factor, shift)``: unit concepts with a conversion into the canonical unit.

    A declared unitless feature (``unit = "1"``) takes instead the UCUM dimensionless units (code ``1`` or an
    annotation alone, ``{score}``...) and concept 0 (no unit; a NULL ``unit_concept_id`` is joined as 0).
    """
    concept = qualified(site.vocabulary_schema, "concept")
    if m.unitless:
        return [f"m{k}_unit_ids AS (SELECT c.concept_id, 1.0 AS factor, 0.0 AS shift FROM {concept} c"
                " WHERE c.vocabulary_id = 'UCUM' AND c.concept_id <> 0"
                " AND (c.concept_code = '1' OR (SUBSTR(c.concept_code, 1, 1) = '{'"
                " AND SUBSTR(c.concept_code, LENGTH(c.concept_code), 1) = '}'))"
                " UNION ALL SELECT 0, 1.0, 0.0)"]
    units = conversions_to(m.analyte, m.unit)
    values = ", ".join(f"({b.unit(code)}, {b.float(factor)}, {b.float(offset)})"
                       for code, (factor, offset) in units.items())
    return [
        f"m{k}_units(unit_code, factor, shift) AS (VALUES {values})",
        f"m{k}_unit_ids AS (SELECT c.concept_id, MIN(u.factor) AS factor, MIN(u.shift) AS shift FROM {concept} c"
        f" JOIN m{k}_units u ON u.unit_code = c.concept_code WHERE c.vocabulary_id = 'UCUM' GROUP BY c.concept_id"
        " HAVING MIN(u.factor) = MAX(u.factor) AND MIN(u.shift) = MAX(u.shift))",
    ]


def _measurement_row_ctes(b: _Binds, site: SiteConfig, k: int, m: MeasurementFeature) -> list[str]:
    """CTEs up to ``m{k}_rows``: one row per usable-or-not value (measurement or observation) in the window."""
    table, concept_column, date_column, datetime_column, id_column = VALUE_TABLES[m.domain]
    events = qualified(site.cdm_schema, table)
    unit_key = "COALESCE(e.unit_concept_id, 0)" if m.unitless else "e.unit_concept_id"
    return [
        _concepts_cte(f"m{k}_concepts", m.concepts, m.descendants, site, f"measurement {m.name}"),
        *_unit_ids_cte(b, site, k, m),
        f"m{k}_rows AS (SELECT t.person_id, e.{date_column} AS event_date, e.{datetime_column} AS event_time,"
        f" e.{id_column} AS row_id, e.unit_concept_id,"
        f" CASE WHEN u.concept_id IS NULL THEN {_UNKNOWN_UNIT}"
        f" WHEN NOT (ABS(e.value_as_number) <= {ABSURD_MAGNITUDE}) THEN {_NON_FINITE_VALUE}"
        f" ELSE {_OK} END AS status,"
        f" CASE WHEN ABS(e.value_as_number) <= {ABSURD_MAGNITUDE}"
        " THEN CAST(e.value_as_number AS DOUBLE PRECISION) * u.factor + u.shift END AS value"
        f" FROM target t JOIN {events} e ON e.person_id = t.person_id"
        f" JOIN m{k}_concepts k ON k.concept_id = e.{concept_column}"
        f" LEFT JOIN m{k}_unit_ids u ON u.concept_id = {unit_key}"
        f" WHERE {_window(b, 'e.' + date_column, m.window, m.name)} AND e.value_as_number IS NOT NULL)",
    ]


def _measurement_ctes(b: _Binds, site: SiteConfig, k: int, m: MeasurementFeature) -> list[str]:
    ctes = _measurement_row_ctes(b, site, k, m)
    counts = (f"SUM(CASE WHEN status = {_UNKNOWN_UNIT} THEN 1 ELSE 0 END) AS unknown_unit,"
              f" SUM(CASE WHEN status = {_NON_FINITE_VALUE} THEN 1 ELSE 0 END) AS non_finite")
    if m.aggregate != "last":
        value = {"mean": f"AVG(CASE WHEN status = {_OK} THEN value END)",
                 "min": f"MIN(CASE WHEN status = {_OK} THEN value END)",
                 "max": f"MAX(CASE WHEN status = {_OK} THEN value END)",
                 "count": f"SUM(CASE WHEN status = {_OK} THEN 1 ELSE 0 END)"}[m.aggregate]
        ctes.append(f"m{k} AS (SELECT person_id, {value} AS value, {counts} FROM m{k}_rows GROUP BY person_id)")
        return ctes
    ctes.append(
        f"m{k}_ranked AS (SELECT r.person_id, r.status, r.value, ROW_NUMBER() OVER (PARTITION BY r.person_id,"
        " r.status ORDER BY r.event_date DESC, r.event_time DESC NULLS LAST, r.row_id DESC, r.value DESC) AS rn"
        f" FROM m{k}_rows r)"
    )
    ctes.append(f"m{k} AS (SELECT person_id, MAX(CASE WHEN status = {_OK} AND rn = 1 THEN value END) AS value,"
                f" {counts} FROM m{k}_ranked GROUP BY person_id)")
    return ctes


def _categorical_ctes(b: _Binds, site: SiteConfig, k: int, c: CategoricalFeature) -> list[str]:
    """``c{k}(person_id, level)``: the level of the person's last ``value_as_concept_id`` in the window.

    Rows whose ``value_as_concept_id`` is NULL or 0 hold no value and are ignored; the last row is the latest
    date, then datetime, then row id (all descending); its value maps onto the study's level or ``other``.
    """
    table, concept_column, date_column, datetime_column, id_column = VALUE_TABLES[c.domain]
    events = qualified(site.cdm_schema, table)
    cases = " ".join(
        f"WHEN r.value_concept_id IN ({', '.join(str(i) for i in _concept_ids(ids, f'categorical {c.name}'))})"
        f" THEN '{label}'" for label, ids in c.levels)  # labels match LEVEL_RE (checked by the study parser)
    if not all(LEVEL_RE.match(label) for label in c.labels):
        raise ConfigError(f"categorical {c.name}: level names must be lower-case names")
    return [
        _concepts_cte(f"c{k}_concepts", c.concepts, c.descendants, site, f"categorical {c.name}"),
        f"c{k}_ranked AS (SELECT t.person_id, e.value_as_concept_id AS value_concept_id, ROW_NUMBER() OVER"
        f" (PARTITION BY t.person_id ORDER BY e.{date_column} DESC, e.{datetime_column} DESC NULLS LAST,"
        f" e.{id_column} DESC, e.value_as_concept_id DESC) AS rn"
        f" FROM target t JOIN {events} e ON e.person_id = t.person_id"
        f" JOIN c{k}_concepts k ON k.concept_id = e.{concept_column}"
        f" WHERE {_window(b, 'e.' + date_column, c.window, c.name)}"
        " AND e.value_as_concept_id IS NOT NULL AND e.value_as_concept_id <> 0)",
        f"c{k} AS (SELECT r.person_id, CASE {cases} ELSE '{OTHER_LEVEL}' END AS level FROM c{k}_ranked r"
        " WHERE r.rn = 1)",
    ]


_AGE = (
    "CAST(EXTRACT(YEAR FROM t.index_date) AS INTEGER) - p.year_of_birth"
    " - CASE WHEN CAST(EXTRACT(MONTH FROM t.index_date) AS INTEGER) * 100"
    " + CAST(EXTRACT(DAY FROM t.index_date) AS INTEGER)"
    " < COALESCE(p.month_of_birth, 1) * 100 + COALESCE(p.day_of_birth, 1) THEN 1 ELSE 0 END"
)
_SEX = "CASE p.gender_concept_id WHEN 8507 THEN 'male' WHEN 8532 THEN 'female' ELSE 'other' END"


def _select_list(study: StudyConfig) -> tuple[list[str], list[str]]:
    """SELECT expressions in :func:`feature_columns` order, and the joins they need."""
    concept_sets = {f.name: (k, f) for k, f in enumerate(study.concept_sets)}
    measurements = {m.name: k for k, m in enumerate(study.measurements)}
    exprs: dict[str, str] = {
        "person_id": "t.person_id",
        "index_date": "t.index_date",
        "label": "CASE WHEN o.person_id IS NULL THEN 0 ELSE 1 END",
        "age": _AGE,
        "sex": _SEX,
        "prior_observation_days": "t.index_date - po.obs_start",
    }
    for name, (k, f) in concept_sets.items():
        exprs[name] = f"COALESCE(cs{k}.n, 0)" if f.aggregate == "count" else \
            f"CASE WHEN cs{k}.n > 0 THEN 1 ELSE 0 END"
    for name, k in measurements.items():
        exprs[name] = f"COALESCE(m{k}.value, 0)" if study.measurements[k].aggregate == "count" else f"m{k}.value"
        exprs[name + UNKNOWN_UNIT_SUFFIX] = f"COALESCE(m{k}.unknown_unit, 0)"
        exprs[name + NON_FINITE_SUFFIX] = f"COALESCE(m{k}.non_finite, 0)"
    for k, c in enumerate(study.categoricals):
        exprs[c.name] = f"c{k}.level"
    select = [f"{exprs[c.name]} AS {quote_identifier(c.name)}" for c in feature_columns(study)]
    joins = ["LEFT JOIN outcome o ON o.person_id = t.person_id"]
    if {"age", "sex"} & set(study.demographics):
        joins.append("LEFT JOIN person_one p ON p.person_id = t.person_id")
    if "prior_observation_days" in study.demographics:
        joins.append("LEFT JOIN prior_obs po ON po.person_id = t.person_id")
    joins += [f"LEFT JOIN cs{k} ON cs{k}.person_id = t.person_id" for k in range(len(study.concept_sets))]
    joins += [f"LEFT JOIN m{k} ON m{k}.person_id = t.person_id" for k in range(len(study.measurements))]
    joins += [f"LEFT JOIN c{k} ON c{k}.person_id = t.person_id" for k in range(len(study.categoricals))]
    return select, joins


def feature_query(
    site: SiteConfig,
    study: StudyConfig,
    target_id: int,
    outcome_id: int,
    *,
    literal: bool = False,
) -> tuple[sa.TextClause | str, dict[str, Any]]:
    """The feature query (same SQL on PostgreSQL and DuckDB), ordered by person_id.

    Parameters
    ----------
    site:
        Schemas of the CDM, vocabulary and results (cohort table).
    study:
        Features, windows, time at risk.
    target_id, outcome_id:
        ``cohort_definition_id`` of the target and outcome cohorts in ``<results>.cohort``.
    literal:
        Render every parameter into the text (they are all integers, finite floats and UCUM unit
        codes of a restricted alphabet) and return ``(str, {})``, e.g. for
        ``COPY (<sql>) TO STDOUT`` through ``cursor.copy_expert``.  The text may hold ``%`` (a unit
        code): run it without parameters, or wrap it in ``sqlalchemy.text``, never through a
        driver's ``%``-formatting.  Otherwise return ``(TextClause, params)``.

    Returns
    -------
    (TextClause or str, dict)
        Statement and its parameters; its columns are :func:`feature_columns` ``(study)``.
    """
    b = _Binds(literal)
    ctes = _target_ctes(b, site, target_id) + _person_ctes(b, site, study, outcome_id)
    for k, f in enumerate(study.concept_sets):
        ctes += _concept_set_ctes(b, site, k, f)
    for k, m in enumerate(study.measurements):
        ctes += _measurement_ctes(b, site, k, m)
    for k, c in enumerate(study.categoricals):
        ctes += _categorical_ctes(b, site, k, c)
    select, joins = _select_list(study)
    sql = ("WITH " + ",\n".join(ctes) + "\nSELECT " + ",\n  ".join(select) + "\nFROM target t\n"
           + "\n".join(joins) + "\nORDER BY t.person_id")
    return (sql, {}) if literal else (sa.text(sql), b.params)


# --------------------------------------------------------------------------------------------
# running it
# --------------------------------------------------------------------------------------------

_INT_KINDS = ("id", "label", "binary", "count", "unknown_unit", "non_finite")


def _frame(rows: Sequence[Any], columns: tuple[ColumnSpec, ...]) -> pd.DataFrame:
    """Rows of the feature query as a DataFrame with the dtypes of the column spec."""
    names = [c.name for c in columns]
    raw = pd.DataFrame.from_records([tuple(r) for r in rows], columns=names) if rows else \
        pd.DataFrame({n: pd.Series([], dtype=object) for n in names})
    out: dict[str, Any] = {}
    for spec in columns:
        values = raw[spec.name]
        if spec.kind in _INT_KINDS:
            out[spec.name] = values.astype(np.int64)
        elif spec.kind == "date":
            out[spec.name] = pd.to_datetime(values).astype("datetime64[ns]")
        elif spec.kind == "numeric":
            out[spec.name] = pd.to_numeric(values.astype(object), errors="coerce").astype(np.float64)
        else:
            out[spec.name] = values.astype(object)
    return pd.DataFrame(out, columns=names)


def _failed(site: SiteConfig, what: str, exc: BaseException) -> DatabaseError:
    return DatabaseError(f"site {site.name}: {what} failed ({describe_driver_error(exc)})")


def stream_features(
    conn: sa.Connection,
    site: SiteConfig,
    study: StudyConfig,
    target_id: int,
    outcome_id: int,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> Iterator[pd.DataFrame]:
    """Yield the feature frame in chunks of at most ``chunk_rows`` persons, ordered by person_id.

    The statement runs with ``stream_results=True`` and ``yield_per=chunk_rows`` for this
    execution only (the connection's own options are not changed): a named server-side cursor on
    PostgreSQL; on DuckDB (no server-side cursors) the embedded engine holds the result and Python
    takes it ``fetchmany(chunk_rows)`` at a time.  An empty cohort yields one empty
    frame with the right columns.  Bad input raises at the call; the query runs on the first
    ``next()``.  Closing the generator early closes the cursor.

    Raises
    ------
    ConfigError
        ``chunk_rows < 1``, a cohort id or window that is not an integer, a bad schema name.
    DatabaseError
        The query failed (message without driver text).
    """
    chunk_rows = _check_int(chunk_rows, "chunk_rows")
    if chunk_rows < 1:
        raise ConfigError("chunk_rows must be at least 1")
    clause, params = feature_query(site, study, target_id, outcome_id)  # checks the input before any I/O
    return _stream(conn, site, clause, params, feature_columns(study), chunk_rows)


def _stream(conn: sa.Connection, site: SiteConfig, clause: sa.TextClause, params: dict[str, Any],
            columns: tuple[ColumnSpec, ...], chunk_rows: int) -> Iterator[pd.DataFrame]:
    try:
        result = conn.execute(clause, params, execution_options={"stream_results": True, "yield_per": chunk_rows})
    except sa.exc.DBAPIError as exc:
        raise _failed(site, "feature query", exc) from None
    try:
        chunks = 0
        while True:
            try:
                rows = result.fetchmany(chunk_rows)
            except sa.exc.DBAPIError as exc:
                raise _failed(site, "feature query", exc) from None
            if not rows and chunks:
                break
            chunks += 1
            yield _frame(rows, columns)
            if not rows:
                break
    finally:
        result.close()


def unknown_unit_counts(
    conn: sa.Connection, site: SiteConfig, study: StudyConfig, target_id: int
) -> dict[str, dict[str, int]]:
    """Measurement rows not used because their unit has no conversion, by unit code.

    Returns
    -------
    dict
        ``{measurement feature: {unit code: rows}}`` over the target cohort (first entry per
        person, the feature's window, non-NULL values), one entry per measurement feature.  The
        code is the unit concept's ``concept_code`` (any vocabulary), else ``"concept_id <id>"``,
        or ``"<none>"`` for a NULL ``unit_concept_id``.  Site-local: counts may be small.
    """
    out: dict[str, dict[str, int]] = {}
    concept = qualified(site.vocabulary_schema, "concept")
    for k, m in enumerate(study.measurements):
        b = _Binds(literal=False)
        ctes = _target_ctes(b, site, target_id) + _measurement_row_ctes(b, site, k, m)
        sql = (
            "WITH " + ",\n".join(ctes)
            + f",\nunknown AS (SELECT unit_concept_id, COUNT(*) AS n FROM m{k}_rows WHERE status = {_UNKNOWN_UNIT}"
            " GROUP BY unit_concept_id)\n"
            f"SELECT u.unit_concept_id, (SELECT MIN(c.concept_code) FROM {concept} c"
            " WHERE c.concept_id = u.unit_concept_id) AS code, u.n FROM unknown u ORDER BY u.unit_concept_id"
        )
        try:
            rows = conn.execute(sa.text(sql), b.params).all()
        except sa.exc.DBAPIError as exc:
            raise _failed(site, f"unknown-unit count of {m.name}", exc) from None
        counts: dict[str, int] = {}
        for unit_id, code, n in rows:
            if unit_id is None or int(unit_id) == 0:
                label = NO_VALUE  # no unit recorded
            else:
                label = str(code) if code is not None else f"concept_id {unit_id}"
            counts[label] = counts.get(label, 0) + int(n)
        out[m.name] = dict(sorted(counts.items()))
    return out


@dataclass
class FeatureFrame:
    """A whole site's feature frame in memory, with its column spec and unknown-unit counts.

    Attributes
    ----------
    frame:
        The concatenated chunks of :func:`stream_features`.
    columns:
        :func:`feature_columns` of the study: name, kind, unit, feature and levels of each column.
    unknown_units:
        :func:`unknown_unit_counts`; pass it to :func:`omopfl.harmonize.harmonize`.
    """

    frame: pd.DataFrame
    columns: tuple[ColumnSpec, ...]
    unknown_units: dict[str, dict[str, int]] = field(default_factory=dict)

    def spec(self) -> list[dict[str, Any]]:
        """The column spec as plain dicts (for JSON reports)."""
        return [c.to_dict() for c in self.columns]


def read_features(
    conn: sa.Connection,
    site: SiteConfig,
    study: StudyConfig,
    target_id: int,
    outcome_id: int,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> FeatureFrame:
    """:func:`stream_features` concatenated, plus :func:`unknown_unit_counts`."""
    chunks = list(stream_features(conn, site, study, target_id, outcome_id, chunk_rows))
    frame = pd.concat(chunks, ignore_index=True) if len(chunks) > 1 else chunks[0]
    return FeatureFrame(frame, feature_columns(study), unknown_unit_counts(conn, site, study, target_id))
