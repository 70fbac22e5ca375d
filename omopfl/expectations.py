"""Great Expectations on the prepared feature frame (``source="expectation"`` checks of validation).

A suite generated from the study specification (:func:`expectation_suite_for`) is run on the feature
frame (one row per person) in an ephemeral, in-memory GE context that writes no files and shows no
progress bars (:func:`run_expectations`).  This is the only module that imports ``great_expectations``
(lazily: it takes seconds to import).

A check *fails* when its share of violating rows exceeds its threshold (0 % for every row-level check
here, so any violating row fails it); a failed check is reported at its level.

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
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from omopfl.study import StudyConfig
from omopfl.validation_report import FATAL, WARNING, CheckResult

if TYPE_CHECKING:
    import pandas as pd
    from great_expectations.core import ExpectationSuite

__all__ = [
    "FRAME_TABLE",
    "KEY_COLUMNS",
    "START_DATE_COLUMNS",
    "END_DATE_COLUMNS",
    "expectation_suite_for",
    "run_expectations",
]

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
_META = "omopfl"


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
    kept.sort(key=lambda r: (r.level != FATAL, r.check == "hasColumn" and r.passed))  # fatal first
    return kept
