"""Validation before training: Great Expectations on the feature frame, OHDSI-style checks on the CDM.

Two kinds of checks feed one :class:`ValidationReport`:

* **expectations** (``source="expectation"``): a Great Expectations suite generated from the
  study specification (:func:`expectation_suite_for`) and run on the prepared feature frame
  (one row per person) in an ephemeral, in-memory GE context that writes no files and shows
  no progress bars;
* **CDM conformance** (``source="cdm"``): checks in the spirit of the OHDSI Data Quality
  Dashboard, run as SQL in the site's database (:func:`cdm_conformance`); only counts come back.

All failures are collected first; :meth:`ValidationReport.raise_if_fatal` then raises one
:class:`~omopfl.errors.DataError` naming every fatal check.  A fatal failure stops training
unless the site overrides it explicitly (``[validation] allow_fatal`` or ``allow_fatal=True``);
warnings never stop it.  Every result carries counts and names only: no row values, no person
ids, no driver text.

This is the only module that imports ``great_expectations`` (lazily: it takes seconds to import).

Levels
------
A check *fails* when its share of violating rows exceeds its threshold (0 % for every
row-level check here, so any violating row fails it); a failed check is reported at its level.

Feature frame (table ``features``), fatal:

* ``minPersons``: fewer rows than ``[validation] min_persons`` (an empty frame always);
* ``hasColumn``: a key column (``person_id``, ``label``, ``index_date``) or a study feature is absent;
* ``isRequired``: NULL ``person_id``, ``label`` or ``index_date``;
* ``isPrimaryKey``: a ``person_id`` on more than one row (the count is every row involved);
* ``isBinary``: ``label``, a ``sex_*`` column or a presence concept-set feature outside {0, 1};
* ``isNumeric``: a feature column of a non-numeric dtype;
* ``measureValueCompleteness`` (fatal form): a measurement observed in a share of persons below
  ``fatal_completeness`` (only when that is > 0; it replaces the warning for the column).

Feature frame, warnings (with the count of violating rows):

* ``plausibleRange``: a measurement outside its study ``range`` (canonical unit), age outside [0, 120];
* ``plausibleValueLow``: a count feature or ``prior_observation_days`` below 0;
* ``measureValueCompleteness``: a measurement observed in a share of persons below ``min_completeness``;
* ``plausibleTemporalAfter``: ``index_date`` before ``birth_date`` / ``observation_period_start_date``
  / ``observation_start_date``, or after ``observation_period_end_date`` / ``observation_end_date`` /
  ``death_date`` (each only when that column is in the frame).

NaN is a missing value: it counts against completeness, never as a range violation; +/-inf is out
of range.

CDM (DQD check names where one applies), fatal:

* ``cdmTable`` / ``cdmField``: a table, or a required column of a table, that omopfl or the study
  reads (person, observation_period, concept, concept_ancestor, the study's domain tables,
  measurement, image_occurrence when imaging is on) is absent; for other tables: warning;
* ``isRequired``: NULL in person.person_id / gender_concept_id / year_of_birth or in
  observation_period.person_id / start / end date (every feature depends on them);
* ``isPrimaryKey`` on person: one person on several rows.

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
* ``cdmVersion``: the CDM version cannot be told (checked as 5.4).

The duplicate keys and orphan observation periods real CDMs (and Eunomia) have are warnings:
cohort and feature SQL join on person and dates, not on event ids.  The checks `omopfl sites check`
runs too are one ``sql/cdm_*.sql`` file each, read by both commands, so both count the same.  A check whose query fails
(e.g. a date stored as text) is reported as failed at its own level, with the driver's error
class only.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from omopfl.cdm import CLINICAL_TABLES, EVENT_TABLES, VOCABULARY_TABLES, table_columns
from omopfl.config import SiteConfig
from omopfl.db import describe_driver_error, detect_cdm_version, existing_tables, qualified, quote_identifier, sql_text
from omopfl.errors import CdmError, DatabaseError, DataError
from omopfl.study import StudyConfig

if TYPE_CHECKING:
    import pandas as pd
    from great_expectations.core import ExpectationSuite

__all__ = [
    "FATAL",
    "WARNING",
    "CheckResult",
    "ValidationReport",
    "expectation_suite_for",
    "run_expectations",
    "cdm_conformance",
    "validate",
    "FRAME_TABLE",
    "KEY_COLUMNS",
    "START_DATE_COLUMNS",
    "END_DATE_COLUMNS",
]

FATAL = "fatal"
WARNING = "warning"
FRAME_TABLE = "features"
KEY_COLUMNS = ("person_id", "label", "index_date")
# Optional date columns of the frame: the index date must not precede these ...
START_DATE_COLUMNS = ("birth_date", "observation_period_start_date", "observation_start_date")
# ... nor follow these.
END_DATE_COLUMNS = ("observation_period_end_date", "observation_end_date", "death_date")
AGE_RANGE = (0.0, 120.0)
NUMERIC_DTYPES = [
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "bool",
]
DEATH_SLACK_DAYS = 60  # DQD's plausibleBeforeDeath allows events up to 60 days after death
_META = "omopfl"

# Tables omopfl itself cannot work without (cohorts need the vocabulary hierarchy).
CORE_TABLES = ("person", "observation_period", "concept", "concept_ancestor")
# Required fields whose NULLs are fatal: every feature depends on them.
FATAL_REQUIRED_FIELDS = {
    ("person", "person_id"), ("person", "gender_concept_id"), ("person", "year_of_birth"),
    ("observation_period", "person_id"), ("observation_period", "observation_period_start_date"),
    ("observation_period", "observation_period_end_date"),
}


# ----------------------------------------------------------------------------------------------
# Results and report
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check: names and counts only.

    Attributes
    ----------
    source:
        ``"expectation"`` (feature frame, Great Expectations) or ``"cdm"`` (SQL in the database).
    check:
        Check name; OHDSI DQD names where one applies (``isPrimaryKey``, ``plausibleAfterBirth``, ...).
    table:
        CDM table, or ``"features"`` for the prepared feature frame.
    field:
        Column checked, or None for table-level checks.
    level:
        ``"fatal"`` or ``"warning"``: what a failure of this check means.
    passed:
        Whether the check passed.
    violated:
        Rows violating the check; None when there is nothing to count (absent table or column,
        a check that could not run, the row-count check).
    total:
        Rows checked (rows of the table or frame), or None.
    threshold:
        The limit compared against: the largest share of violating rows (percent) that passes,
        or for ``minPersons`` the smallest row count that passes, or for completeness checks the
        largest share (percent) of missing values that passes.
    description:
        One line for people: what was checked (study and specification numbers only, no data values).
    expectation:
        The Great Expectations expectation type, for ``source="expectation"``.
    """

    source: str
    check: str
    table: str
    field: str | None
    level: str
    passed: bool
    violated: int | None
    total: int | None
    threshold: float | None
    description: str
    expectation: str | None = None

    @property
    def failed(self) -> bool:
        return not self.passed

    @property
    def percent(self) -> float | None:
        """Violating rows as a percent of ``total`` (None when either is unknown or total is 0)."""
        if self.violated is None or not self.total:
            return None
        return 100.0 * self.violated / self.total

    @property
    def where(self) -> str:
        return f"{self.table}.{self.field}" if self.field else self.table

    def counts_text(self) -> str:
        """``"12 of 3400 rows (0.35%)"``, or what is known of it."""
        if self.violated is not None and self.total is not None:
            percent = self.percent
            share = f" ({percent:.3g}%)" if percent is not None else ""
            return f"{self.violated} of {self.total} rows{share}"
        if self.violated is not None:
            return f"{self.violated} rows"
        if self.total is not None:
            return f"{self.total} rows"
        return ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (names, counts, thresholds)."""
        data = dataclasses.asdict(self)
        data["percent"] = self.percent
        return data


def _level_order(result: CheckResult) -> int:
    return 0 if result.level == FATAL else 1


@dataclass
class ValidationReport:
    """All checks run for one site and study; failures are collected, then raised once.

    Attributes
    ----------
    site:
        Site name.
    study:
        Study name, or None for CDM checks alone.
    cdm_version:
        CDM version checked against ("5.4" or "5.3"), or None for frame checks alone.
    persons:
        Rows of the feature frame, or None when no frame was checked.
    results:
        Every check run, passed or failed.
    allow_fatal:
        The site or study overrides fatal failures (they are still reported).
    """

    site: str
    study: str | None = None
    cdm_version: str | None = None
    persons: int | None = None
    results: list[CheckResult] = dataclasses.field(default_factory=list)
    allow_fatal: bool = False

    @property
    def fatal(self) -> list[CheckResult]:
        """Failed checks of level fatal."""
        return [r for r in self.results if r.failed and r.level == FATAL]

    @property
    def warnings(self) -> list[CheckResult]:
        """Failed checks of level warning."""
        return [r for r in self.results if r.failed and r.level == WARNING]

    @property
    def passed(self) -> list[CheckResult]:
        return [r for r in self.results if r.passed]

    @property
    def ok(self) -> bool:
        """True when no check failed fatally, or when fatal failures are overridden by ``allow_fatal``."""
        return not self.fatal or self.allow_fatal

    def extend(self, results: Iterable[CheckResult]) -> None:
        self.results.extend(results)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: names and counts only (no row values, no person ids).

        Keys: ``site``, ``study``, ``cdm_version``, ``persons``, ``ok``, ``allow_fatal``,
        ``fatal_count``, ``warning_count``, ``passed_count``, ``summary_text`` and ``results``
        (failed first, fatal first; each :meth:`CheckResult.to_dict`).
        """
        return {
            "site": self.site,
            "study": self.study,
            "cdm_version": self.cdm_version,
            "persons": self.persons,
            "ok": self.ok,
            "allow_fatal": self.allow_fatal,
            "fatal_count": len(self.fatal),
            "warning_count": len(self.warnings),
            "passed_count": len(self.passed),
            "summary_text": self.summary_text(),
            "results": [r.to_dict() for r in sorted(self.results, key=lambda r: (r.passed, _level_order(r)))],
        }

    def summary_text(self) -> str:
        """A readable multi-line summary: fatal failures first, then warnings, then a count of passed checks."""
        head = f"Validation of site {self.site}"
        if self.study:
            head += f", study {self.study}"
        if self.cdm_version:
            head += f" (CDM {self.cdm_version})"
        if self.persons is not None:
            head += f", {self.persons} persons"
        fatal, warnings = self.fatal, self.warnings
        head += f": {len(fatal)} fatal, {len(warnings)} warning(s), {len(self.passed)} passed"
        lines = [head]
        if fatal and self.allow_fatal:
            lines.append("fatal failures are overridden (allow_fatal): training may proceed")
        elif fatal:
            lines.append("fatal failures stop training unless the site overrides them (allow_fatal)")
        for label, group in (("FATAL", fatal), ("WARNING", warnings)):
            for r in group:
                counts = r.counts_text()
                lines.append(
                    f"  {label:<7} {r.source:<11} {r.where:<45} {r.check:<34} "
                    f"{counts + ': ' if counts else ''}{r.description}"
                )
        if not fatal and not warnings:
            lines.append("  all checks passed")
        return "\n".join(lines)

    def raise_if_fatal(self, allow_fatal: bool = False) -> None:
        """Raise one :class:`DataError` naming every fatal check, unless overridden.

        Parameters
        ----------
        allow_fatal:
            The site overrides fatal failures explicitly (also honoured: ``self.allow_fatal``).

        Raises
        ------
        DataError
            One line: the site, the number of fatal checks and, for each, where, which check and
            its counts.
        """
        fatal = self.fatal
        if not fatal or allow_fatal or self.allow_fatal:
            return
        items = []
        for r in fatal:
            counts = r.counts_text()
            items.append(f"{r.where} {r.check}" + (f" {counts}" if counts else ""))
        study = f" for study {self.study}" if self.study else ""
        message = (
            f"site {self.site}: validation{study} failed with {len(fatal)} fatal check(s): {'; '.join(items)}; "
            "fix the data or override explicitly with allow_fatal"
        )
        raise DataError(" ".join(message.split()))


# ----------------------------------------------------------------------------------------------
# Great Expectations on the feature frame
# ----------------------------------------------------------------------------------------------
def _gx():
    """Import Great Expectations (slow: seconds) on first use."""
    with warnings.catch_warnings():  # its own imports of deprecated stdlib modules
        warnings.simplefilter("ignore", DeprecationWarning)
        import great_expectations as gx
        import great_expectations.expectations as gxe

    return gx, gxe


def _context():
    """An ephemeral (in-memory) GE context with progress bars off: writes no files, prints nothing."""
    gx, _ = _gx()
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),  # no docs site folder
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
        analytics_enabled=False,
    )
    return gx.get_context(project_config=config, mode="ephemeral")


def _frame_features(study: StudyConfig) -> dict[str, tuple[str, ...]]:
    """Feature name -> kind (``binary``, ``count``, ``age``, ``days``, ``measurement``) from the study."""
    kinds: dict[str, tuple[str, ...]] = {}
    for name in study.feature_names():
        kinds[name] = ("binary",) if name.startswith("sex_") and "sex" in study.demographics else ()
    if "age" in study.demographics:
        kinds["age"] = ("age",)
    if "prior_observation_days" in study.demographics:
        kinds["prior_observation_days"] = ("days",)
    for f in study.concept_sets:
        kinds[f.name] = ("binary",) if f.aggregate == "presence" else ("count",)
    for m in study.measurements:
        kinds[m.name] = ("measurement",) if m.can_be_missing else ("count",)
    for c in study.categoricals:
        kinds.update({column: ("binary",) for column in c.columns()})
    return kinds


def expectation_suite_for(
    study: StudyConfig, feature_columns: Sequence[str], *, columns: Sequence[str] | None = None
) -> ExpectationSuite:
    """Build the Great Expectations suite for a study's prepared feature frame.

    Parameters
    ----------
    study:
        The study: its features, measurement plausible ranges and ``[validation]`` thresholds.
    feature_columns:
        The frame's model feature columns (usually ``study.feature_names()``); each must be numeric.
        Every study feature is expected to exist, whether listed here or not.
    columns:
        All columns of the frame, for the checks that depend on optional columns (``birth_date``,
        ``observation_period_start_date``, ``observation_period_end_date``, ``death_date``, ...).
        Default: ``person_id``, ``label``, ``index_date`` and ``feature_columns``.

    Returns
    -------
    great_expectations.core.ExpectationSuite
        Each expectation's ``meta["omopfl"]`` holds its check name, level, table and description
        (see the module docstring for the mapping).
    """
    gx, gxe = _gx()
    v = study.validation
    kinds = _frame_features(study)
    features = list(dict.fromkeys([*study.feature_names(), *feature_columns]))
    present = set(columns) if columns is not None else {*KEY_COLUMNS, *feature_columns}
    expectations: list[Any] = []

    def add(expectation: type, check: str, level: str, description: str, threshold: float | None = 0.0,
            **kwargs: Any) -> None:
        meta = {_META: {"check": check, "level": level, "description": description, "threshold": threshold}}
        expectations.append(expectation(meta=meta, **kwargs))

    min_rows = max(1, int(v.min_persons))
    add(gxe.ExpectTableRowCountToBeBetween, "minPersons", FATAL,
        f"fewer than {min_rows} persons (min_persons)", threshold=float(min_rows), min_value=min_rows)
    for column in (*KEY_COLUMNS, *features):
        what = "key column" if column in KEY_COLUMNS else "study feature" if column in kinds else "feature column"
        add(gxe.ExpectColumnToExist, "hasColumn", FATAL, f"{what} absent from the frame", threshold=None,
            column=column)
    add(gxe.ExpectColumnValuesToNotBeNull, "isRequired", FATAL, "person_id is NULL", column="person_id")
    add(gxe.ExpectColumnValuesToBeUnique, "isPrimaryKey", FATAL, "person_id on more than one row (one row per person)",
        column="person_id")
    add(gxe.ExpectColumnValuesToNotBeNull, "isRequired", FATAL, "label is NULL", column="label")
    add(gxe.ExpectColumnValuesToBeInSet, "isBinary", FATAL, "label not in {0, 1}", column="label", value_set=[0, 1])
    add(gxe.ExpectColumnValuesToNotBeNull, "isRequired", FATAL, "index_date is NULL", column="index_date")

    for column in features:
        if column not in present:
            continue  # absent: hasColumn reports it
        add(gxe.ExpectColumnValuesToBeInTypeList, "isNumeric", FATAL, "feature column is not numeric",
            threshold=None, column=column, type_list=NUMERIC_DTYPES)
        kind = kinds.get(column, ())
        if "binary" in kind:
            add(gxe.ExpectColumnValuesToBeInSet, "isBinary", FATAL, "binary feature not in {0, 1}",
                column=column, value_set=[0, 1])
        elif "count" in kind:
            add(gxe.ExpectColumnValuesToBeBetween, "plausibleValueLow", WARNING, "count below 0",
                column=column, min_value=0)
        elif "days" in kind:
            add(gxe.ExpectColumnValuesToBeBetween, "plausibleValueLow", WARNING, "days of prior observation below 0",
                column=column, min_value=0)
        elif "age" in kind:
            low, high = AGE_RANGE
            add(gxe.ExpectColumnValuesToBeBetween, "plausibleRange", WARNING, f"age outside [{low:g}, {high:g}] years",
                column=column, min_value=low, max_value=high)

    for m in study.measurements:
        if m.name not in present or not m.can_be_missing:
            continue
        if m.plausible_range is not None:
            low, high = m.plausible_range
            add(gxe.ExpectColumnValuesToBeBetween, "plausibleRange", WARNING,
                f"value outside the plausible range [{low:g}, {high:g}] {m.unit}",
                column=m.name, min_value=low, max_value=high)
        if v.min_completeness > 0:
            add(gxe.ExpectColumnValuesToNotBeNull, "measureValueCompleteness", WARNING,
                f"missing: observed in fewer than {v.min_completeness:.0%} of persons (min_completeness)",
                threshold=100.0 * (1.0 - v.min_completeness), column=m.name, mostly=min(1.0, v.min_completeness))
        if v.fatal_completeness > 0:
            add(gxe.ExpectColumnValuesToNotBeNull, "measureValueCompleteness", FATAL,
                f"missing: observed in fewer than {v.fatal_completeness:.0%} of persons (fatal_completeness)",
                threshold=100.0 * (1.0 - v.fatal_completeness), column=m.name,
                mostly=min(1.0, v.fatal_completeness))

    if "index_date" in present:
        for column in START_DATE_COLUMNS:
            if column in present:
                add(gxe.ExpectColumnPairValuesAToBeGreaterThanB, "plausibleTemporalAfter", WARNING,
                    f"index_date before {column}", column_A="index_date", column_B=column, or_equal=True,
                    ignore_row_if="either_value_is_missing")
        for column in END_DATE_COLUMNS:
            if column in present:
                add(gxe.ExpectColumnPairValuesAToBeGreaterThanB, "plausibleTemporalAfter", WARNING,
                    f"index_date after {column}", column_A=column, column_B="index_date", or_equal=True,
                    ignore_row_if="either_value_is_missing")
    # Built in one go: ExpectationSuite.add_expectation needs an active context (and would try to save).
    return gx.ExpectationSuite(name=f"omopfl_{study.name}", expectations=expectations)


def _ge_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Nullable pandas numbers (``Int64``, ``Float64``, ``boolean``) as numpy floats: GE's type checks
    reject extension dtypes."""
    import pandas as pd

    out = frame
    for column in frame.columns:
        dtype = frame[column].dtype
        if isinstance(dtype, pd.api.extensions.ExtensionDtype) and (
            pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype)
        ):
            if out is frame:
                out = frame.copy(deep=False)
            out[column] = frame[column].astype("float64")
    return out


def _raised(exception_info: Any) -> bool:
    if not isinstance(exception_info, dict):
        return False
    if exception_info.get("raised_exception"):
        return True
    return any(isinstance(v, dict) and (v.get("raised_exception") or v.get("exception_message"))
               for v in exception_info.values())


def _as_int(value: Any) -> int | None:
    return None if value is None else int(value)


def run_expectations(suite: ExpectationSuite, frame: pd.DataFrame) -> list[CheckResult]:
    """Run a suite on a DataFrame in an ephemeral GE context; return one result per expectation.

    Results hold counts only: GE is asked for no unexpected values, and none are copied.
    An expectation that could not be evaluated on a column that is absent or not numeric is
    dropped (``hasColumn`` / ``isNumeric`` already report the column); a fatal completeness
    failure replaces the completeness warning of the same column.
    """
    context = _context()
    batch_definition = (
        context.data_sources.add_pandas("omopfl")
        .add_dataframe_asset(FRAME_TABLE)
        .add_batch_definition_whole_dataframe("frame")
    )
    batch = batch_definition.get_batch(batch_parameters={"dataframe": _ge_frame(frame)})
    validation = batch.validate(suite, result_format={"result_format": "BASIC", "partial_unexpected_count": 0})
    rows = len(frame)
    results: list[tuple[CheckResult, bool]] = []
    for item in validation.results:
        config = item.expectation_config
        meta = (config.meta or {}).get(_META, {})
        kwargs = config.kwargs
        column = kwargs.get("column") or kwargs.get("column_A")
        outcome = item.result or {}
        raised = _raised(item.exception_info)
        description = meta.get("description", config.type)
        violated = _as_int(outcome.get("unexpected_count"))
        total = _as_int(outcome.get("element_count"))
        if config.type == "expect_table_row_count_to_be_between":
            violated, total, column = None, _as_int(outcome.get("observed_value")), None
        elif config.type == "expect_column_values_to_be_in_type_list" and not item.success and not raised:
            observed = outcome.get("observed_value")
            if isinstance(observed, str) and observed.isidentifier():
                description = f"{description} (dtype {observed})"
        if raised:
            violated, total = None, rows
            description = f"{description} (could not be evaluated)"
        elif violated is None and total is None and config.type.startswith("expect_column_values"):
            total = rows
        result = CheckResult(
            source="expectation", check=meta.get("check", config.type), table=FRAME_TABLE, field=column,
            level=meta.get("level", WARNING), passed=bool(item.success) and not raised, violated=violated,
            total=total, threshold=meta.get("threshold"), description=description, expectation=config.type,
        )
        results.append((result, raised))

    broken = {r.field for r, _ in results if r.failed and r.check in {"hasColumn", "isNumeric"}}
    absent = {r.field for r, _ in results if r.failed and r.check == "hasColumn"}
    fatal_incomplete = {r.field for r, _ in results
                        if r.failed and r.check == "measureValueCompleteness" and r.level == FATAL}
    kept = []
    for r, raised in results:
        if r.field in broken and r.check not in {"hasColumn", "isNumeric"} and (raised or r.field in absent):
            continue
        if r.check == "measureValueCompleteness" and r.level == WARNING and r.field in fatal_incomplete:
            continue
        kept.append(r)
    kept.sort(key=lambda r: (_level_order(r), r.check == "hasColumn" and r.passed))
    return kept


# ----------------------------------------------------------------------------------------------
# CDM conformance, in SQL
# ----------------------------------------------------------------------------------------------
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
    return _cdm_conformance(conn, site, cdm_version, study)[1]


def _cdm_conformance(
    conn: sa.Connection, site: SiteConfig, cdm_version: str | None, study: StudyConfig | None
) -> tuple[str, list[CheckResult]]:
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

    # One scan per table: its row count and the NULLs in its required columns (generated: the parts
    # depend on which columns exist).  Should the combined query fail (a column of an unexpected type),
    # each part runs on its own.
    for table in checked:
        target = qualified(cdm, table)
        parts: list[tuple[str, str, str, str, str]] = []  # check, field, level, condition, description
        for spec in table_columns(table, version):
            if spec.required and spec.name in usable[table]:
                level = FATAL if (table, spec.name) in FATAL_REQUIRED_FIELDS else WARNING
                parts.append(("isRequired", spec.name, level, f"{q(spec.name)} IS NULL", "NULL in a required column"))
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

    # The checks `omopfl sites check` runs too: one sql/ file each (omopfl.sites uses the same files).
    for table in checked:
        if table not in totals:
            continue
        target = qualified(cdm, table)
        start, end, concept = EVENT_TABLES.get(table, (None, None, None))
        if table == "observation_period":
            start, end = "observation_period_start_date", "observation_period_end_date"
        if has(table, start, end):
            count("plausibleStartBeforeEnd", table, start, WARNING,
                  sql_text("cdm_end_before_start", table=target, start=q(start), end=q(end)), f"{end} before {start}")
        if has(table, concept):
            count("standardConceptRecordCompleteness", table, concept, WARNING,
                  sql_text("cdm_unmapped_concept", table=target, concept_column=q(concept)),
                  f"{concept} is 0 or NULL (no standard concept)")
        if table == "measurement" and has(table, "value_as_number", "unit_concept_id"):
            count("valueWithoutUnit", table, "unit_concept_id", WARNING,
                  sql_text("cdm_measurement_without_unit", measurement=target), "value_as_number without a unit")

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


# ----------------------------------------------------------------------------------------------
# Both
# ----------------------------------------------------------------------------------------------
def _as_dataframe(frame: Any) -> pd.DataFrame:
    import pandas as pd

    if isinstance(frame, pd.DataFrame):
        return frame
    for attribute in ("frame", "data", "table"):
        value = getattr(frame, attribute, None)
        if isinstance(value, pd.DataFrame):
            return value
    raise DataError(f"validation: expected a pandas DataFrame of features, got {type(frame).__name__}")


def validate(
    conn: sa.Connection,
    site: SiteConfig,
    study: StudyConfig,
    frame: Any,
    cdm_version: str | None = None,
    *,
    feature_columns: Sequence[str] | None = None,
) -> ValidationReport:
    """Check a site's CDM and its prepared feature frame; collect every failure in one report.

    Parameters
    ----------
    conn:
        Open connection to the site's database.
    site:
        The site's configuration.
    study:
        The study (features, plausible ranges, ``[validation]`` thresholds and ``allow_fatal``).
    frame:
        The prepared features, one row per person: a DataFrame (or an object holding one as
        ``.frame``) with ``person_id``, ``label``, ``index_date`` and the feature columns.
    cdm_version:
        "5.4" or "5.3"; None detects it.
    feature_columns:
        Model feature columns of the frame (each must be numeric); default: the study's features
        (``study.feature_names()``).  Other frame columns are checked only as key or date columns.

    Returns
    -------
    ValidationReport
        Nothing is raised for data problems: call :meth:`ValidationReport.raise_if_fatal`.
    """
    data = _as_dataframe(frame)
    if feature_columns is None:
        feature_columns = study.feature_names()
    version, cdm_results = _cdm_conformance(conn, site, cdm_version, study)
    report = ValidationReport(site=site.name, study=study.name, cdm_version=version, persons=len(data),
                              allow_fatal=study.validation.allow_fatal)
    report.extend(cdm_results)
    suite = expectation_suite_for(study, feature_columns, columns=list(data.columns))
    report.extend(run_expectations(suite, data))
    return report

