"""Harmonization: units, categories, plausible ranges and missing values, the same at every site.

This module is pure: it imports numpy, pandas, the standard library and the pure omopfl modules
(:mod:`omopfl.moments`, :mod:`omopfl.units`; :mod:`omopfl.study` for annotations only, since the study
reader imports this module) only, so the server and the tests can use it without a
database.

Units
-----
Units are UCUM codes as in the ``concept_code`` of OMOP's UCUM vocabulary (``"mg/dL"``,
``"mmol/L"``, ``"[lb_av]"``, ``"mm[Hg]"``...).  A *family* is a canonical unit and, for every unit
of the family, the pair ``(factor, offset)`` with ``canonical = factor * value + offset``.

* :data:`ANALYTES`: families whose conversions depend on the analyte's molar mass (glucose,
  creatinine, cholesterol, triglycerides) or definition (HbA1c NGSP % and IFCC mmol/mol:
  ``mmol/mol = 10.929 * (% - 2.15)``).  Names in :data:`ANALYTE_ALIASES` (``ldl``, ``hdl``...)
  map onto them.
* :data:`DIMENSIONS`: analyte-independent families (mass, length, pressure, temperature, mass and
  molar concentration, BMI); they apply with ``analyte=None`` and with any analyte.

:func:`conversion` composes two entries of one family; an unknown pair gives ``None`` (a value
is never converted silently).  The constants agree with the synthetic generator
(:data:`omopfl.vocab.LABS`); ``tests/test_harmonize.py`` checks it.

Harmonizing a feature frame
---------------------------
:func:`harmonize` takes a frame as :func:`omopfl.features.stream_features` yields it (columns
described by :func:`feature_columns`; measurements already converted to their canonical unit in
the database) and returns the columns of :func:`harmonized_columns`:

* non-finite numeric values become NaN (counted as ``non_finite``); measurement values outside the
  study's ``range`` (canonical unit, bounds included) become NaN (counted as ``implausible``);
* ``sex`` becomes one 0/1 column per study level (``sex_male``, ``sex_female``...): the levels are
  fixed by the study, not by what a site has; any other value (or none) gives all zeros and is
  counted per value as ``unmapped``;
* each measurement gets a ``<name>__missing`` 0/1 indicator (before any imputation);
* the per-person ``<name>__unknown_unit`` and ``<name>__non_finite`` counts (measurement rows the
  database query could not use) are summed into the report and dropped.

Imputation needs the federated means, so it is a separate step: :func:`impute` (after
:func:`Scaler.from_moments <omopfl.moments.Scaler.from_moments>` on the merged moments).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from omopfl.moments import Scaler
from omopfl.units import MOLAR_MASSES, UNITS, analyte_table, factor_table

if TYPE_CHECKING:  # annotations only: omopfl.study reads this module's unit tables and suffixes
    from omopfl.study import StudyConfig

__all__ = [
    "Scaler",
    "UnitFamily",
    "ANALYTES",
    "ANALYTE_ALIASES",
    "DIMENSIONS",
    "MISSING_SUFFIX",
    "UNKNOWN_UNIT_SUFFIX",
    "NON_FINITE_SUFFIX",
    "NO_VALUE",
    "canonical_analyte",
    "conversion",
    "conversions_to",
    "ColumnSpec",
    "feature_columns",
    "harmonized_columns",
    "model_feature_names",
    "align_categories",
    "add_missing_indicators",
    "missable_measurements",
    "impute",
    "apply_plausible_range",
    "HarmonizationReport",
    "harmonize",
    "harmonize_frame",
]

MISSING_SUFFIX = "__missing"
UNKNOWN_UNIT_SUFFIX = "__unknown_unit"
NON_FINITE_SUFFIX = "__non_finite"
NO_VALUE = "<none>"  # the label of a missing category value in reports


@dataclass(frozen=True)
class UnitFamily:
    """Units convertible into one canonical unit: ``canonical = factor * value + offset``."""

    canonical: str
    to_canonical: Mapping[str, tuple[float, float]]

    def __post_init__(self) -> None:
        if self.to_canonical.get(self.canonical) != (1.0, 0.0):
            raise ValueError(f"family of {self.canonical}: the canonical unit must map with (1.0, 0.0)")


def _family(table: Mapping[str, tuple[float, float]]) -> UnitFamily:
    canonical = next(code for code, pair in table.items() if pair == (1.0, 0.0))
    return UnitFamily(canonical, dict(table))


# Factors come from the UCUM library (omopfl.units: ucumvert + pint); the molar masses there are
# the analyte data. HbA1c's NGSP % and IFCC mmol/mol are two definitions, not two units: their
# master equation (IFCC mmol/mol = 10.929 * (NGSP % - 2.15)) stays here as data.
ANALYTES: dict[str, UnitFamily] = {
    **{name: _family(analyte_table(name)) for name in MOLAR_MASSES},
    "hba1c": UnitFamily("%", {"%": (1.0, 0.0), "mmol/mol": (1.0 / 10.929, 2.15)}),
}
ANALYTE_ALIASES: dict[str, str] = {
    "ldl": "cholesterol",
    "hdl": "cholesterol",
    "ldl_cholesterol": "cholesterol",
    "hdl_cholesterol": "cholesterol",
    "total_cholesterol": "cholesterol",
    "triglyceride": "triglycerides",
    "a1c": "hba1c",
}
DIMENSIONS: dict[str, UnitFamily] = {dimension: _family(factor_table(dimension)) for dimension in UNITS}


def canonical_analyte(analyte: str | None) -> str | None:
    """The :data:`ANALYTES` key of an analyte name or alias (case-insensitive), or None if unknown."""
    if analyte is None:
        return None
    key = analyte.strip().lower()
    key = ANALYTE_ALIASES.get(key, key)
    return key if key in ANALYTES else None


def _families(analyte: str | None) -> list[UnitFamily]:
    """Families to search, the analyte's first."""
    key = canonical_analyte(analyte)
    return ([ANALYTES[key]] if key else []) + list(DIMENSIONS.values())


def _compose(family: UnitFamily, from_unit: str, to_unit: str) -> tuple[float, float]:
    f1, o1 = family.to_canonical[from_unit]
    f2, o2 = family.to_canonical[to_unit]
    if (f2, o2) == (1.0, 0.0):  # into the canonical unit: the table's own numbers, exactly
        return f1, o1
    return f1 / f2, (o1 - o2) / f2


def conversion(analyte: str | None, from_unit: str, to_unit: str) -> tuple[float, float] | None:
    """``(factor, offset)`` with ``to = factor * from + offset``, or None when no conversion is known.

    Parameters
    ----------
    analyte:
        Analyte name or alias (``"glucose"``, ``"ldl"``...) for conversions that depend on it;
        None (or an unknown analyte) for analyte-independent conversions only.
    from_unit, to_unit:
        UCUM codes as in OMOP's UCUM ``concept_code`` (case-sensitive).

    Returns
    -------
    tuple[float, float] or None
        ``(1.0, 0.0)`` when the units are equal; None when the pair is unknown.
    """
    if from_unit == to_unit:
        return 1.0, 0.0
    for family in _families(analyte):
        if from_unit in family.to_canonical and to_unit in family.to_canonical:
            return _compose(family, from_unit, to_unit)
    return None


def conversions_to(analyte: str | None, to_unit: str) -> dict[str, tuple[float, float]]:
    """Every unit with a known conversion into ``to_unit``: ``{unit: (factor, offset)}``.

    ``to_unit`` itself is always included with ``(1.0, 0.0)``.  This is the table
    :mod:`omopfl.features` renders into SQL.
    """
    out: dict[str, tuple[float, float]] = {to_unit: (1.0, 0.0)}
    for family in _families(analyte):
        if to_unit in family.to_canonical:
            for unit in family.to_canonical:
                out.setdefault(unit, _compose(family, unit, to_unit))
    return out


# --------------------------------------------------------------------------------------------
# column specification
# --------------------------------------------------------------------------------------------

KINDS = ("id", "date", "label", "numeric", "binary", "count", "categorical", "unknown_unit", "non_finite")
_REPORT_ONLY = ("unknown_unit", "non_finite")


@dataclass(frozen=True)
class ColumnSpec:
    """One column of a feature frame.

    Attributes
    ----------
    name:
        Column name.
    kind:
        ``id`` (person_id), ``date`` (index_date), ``label`` (0/1 outcome), ``numeric`` (float,
        NaN when missing), ``binary`` (0/1), ``count`` (non-negative integer), ``categorical``
        (text level), ``unknown_unit`` (count of a person's measurement rows not used because
        their unit has no conversion), ``non_finite`` (count of rows not used because their value
        is NaN or +-inf).  The last two are reported, never model inputs.
    unit:
        UCUM code of a numeric column (``"a"`` years, ``"d"`` days, a measurement's canonical
        unit), None otherwise.
    feature:
        The study feature the column belongs to (``"sex"`` for ``sex_male``, ``"glucose"`` for
        ``glucose__missing``), None for person_id, index_date and label.
    levels:
        The study's levels of a categorical column.
    """

    name: str
    kind: str
    unit: str | None = None
    feature: str | None = None
    levels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"column kind must be one of {', '.join(KINDS)}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "unit": self.unit, "feature": self.feature,
                "levels": list(self.levels)}


_KEYS = (ColumnSpec("person_id", "id"), ColumnSpec("index_date", "date"), ColumnSpec("label", "label"))


def feature_columns(study: StudyConfig) -> tuple[ColumnSpec, ...]:
    """Columns of the frames :func:`omopfl.features.stream_features` yields, in order."""
    columns = list(_KEYS)
    for name in study.demographics:
        if name == "age":
            columns.append(ColumnSpec("age", "numeric", "a", "age"))
        elif name == "sex":
            columns.append(ColumnSpec("sex", "categorical", None, "sex", tuple(study.categories["sex"])))
        else:
            columns.append(ColumnSpec(name, "numeric", "d", name))
    for cs in study.concept_sets:
        columns.append(ColumnSpec(cs.name, "binary" if cs.aggregate == "presence" else "count", None, cs.name))
    for m in study.measurements:
        if m.aggregate == "count":
            columns.append(ColumnSpec(m.name, "count", None, m.name))
        else:
            columns.append(ColumnSpec(m.name, "numeric", m.unit, m.name))
    for c in study.categoricals:
        columns.append(ColumnSpec(c.name, "categorical", None, c.name, c.labels))
    for m in study.measurements:
        columns.append(ColumnSpec(m.name + UNKNOWN_UNIT_SUFFIX, "unknown_unit", None, m.name))
        columns.append(ColumnSpec(m.name + NON_FINITE_SUFFIX, "non_finite", None, m.name))
    return tuple(columns)


def harmonized_columns(study: StudyConfig) -> tuple[ColumnSpec, ...]:
    """Columns :func:`harmonize` returns: keys, ``study.feature_names()``, then missing indicators."""
    columns = list(_KEYS)
    for spec in feature_columns(study):
        if spec.kind in ("id", "date", "label", *_REPORT_ONLY):
            continue
        if spec.kind == "categorical":
            columns += [ColumnSpec(f"{spec.name}_{level}", "binary", None, spec.name) for level in spec.levels]
        else:
            columns.append(spec)
    columns += [ColumnSpec(m.name + MISSING_SUFFIX, "binary", None, m.name) for m in missable_measurements(study)]
    return tuple(columns)


def missable_measurements(study: StudyConfig) -> list:
    """Value features that can be missing (every aggregate but ``count``): each gets ``<name>__missing``.

    Presence and count features are 0 without events, and a categorical's all-zero one-hot already says
    "no value": neither needs an indicator.
    """
    return [m for m in study.measurements if m.can_be_missing]


def model_feature_names(study: StudyConfig) -> list[str]:
    """Model inputs in order: ``study.feature_names()`` plus one missing indicator per measurement."""
    return [c.name for c in harmonized_columns(study) if c.kind not in ("id", "date", "label")]


# --------------------------------------------------------------------------------------------
# steps
# --------------------------------------------------------------------------------------------


def _level_key(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return None
    return str(value).strip().lower()


def align_categories(
    values: pd.Series | Sequence[Any], levels: Sequence[str], prefix: str
) -> tuple[pd.DataFrame, dict[str, int]]:
    """One-hot encode onto levels fixed by the study.

    Parameters
    ----------
    values:
        A site's values (matched to levels after ``strip().lower()``).
    levels:
        The study's levels, in column order; a level no row has still gets a column of zeros.
    prefix:
        Columns are named ``<prefix>_<level>``.

    Returns
    -------
    (DataFrame, dict)
        int64 0/1 columns (index of ``values`` kept), and the count of rows per value that matched
        no level (all-zero rows); a missing value is counted as ``"<none>"``.
    """
    series = values if isinstance(values, pd.Series) else pd.Series(list(values), dtype=object)
    keys = [_level_key(v) for v in series.tolist()]
    wanted = {str(level).strip().lower(): j for j, level in enumerate(levels)}
    if len(wanted) != len(levels):
        raise ValueError("category levels must be distinct (after strip().lower())")
    matrix = np.zeros((len(keys), len(levels)), dtype=np.int64)
    unmapped: dict[str, int] = {}
    for i, key in enumerate(keys):
        j = wanted.get(key) if key is not None else None
        if j is None:
            label = NO_VALUE if key is None else str(series.iloc[i])
            unmapped[label] = unmapped.get(label, 0) + 1
        else:
            matrix[i, j] = 1
    frame = pd.DataFrame(matrix, columns=[f"{prefix}_{level}" for level in levels], index=series.index)
    return frame, dict(sorted(unmapped.items()))


def add_missing_indicators(frame: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    """Return a copy with a ``<col>__missing`` int64 0/1 column (1 where NaN) appended per column."""
    columns = list(columns)
    absent = [c for c in columns if c not in frame.columns]
    if absent:
        raise KeyError(f"columns not in the frame: {', '.join(absent)}")
    indicators = {c + MISSING_SUFFIX: frame[c].isna().to_numpy().astype(np.int64) for c in columns}
    return frame.assign(**indicators)


def impute(frame: pd.DataFrame, means: Mapping[str, float] | Scaler) -> pd.DataFrame:
    """Return a copy with NaN in each named column replaced by its (federated) mean.

    Parameters
    ----------
    frame:
        Harmonized frame (add missing indicators first, or the missingness is lost).
    means:
        ``{column: mean}``, or a :class:`Scaler` (its ``feature_names`` and ``mean``).  Columns of
        the frame not named are left as they are; a named column absent from the frame is an error.
    """
    if isinstance(means, Scaler):
        means = dict(zip(means.feature_names, means.mean.tolist(), strict=True))
    absent = [c for c in means if c not in frame.columns]
    if absent:
        raise KeyError(f"columns not in the frame: {', '.join(absent)}")
    bad = [c for c, v in means.items() if not math.isfinite(float(v))]
    if bad:
        raise ValueError(f"imputation means must be finite: {', '.join(bad)}")
    out = frame.copy()
    for column, mean in means.items():
        if out[column].isna().any():
            out[column] = out[column].astype(np.float64).fillna(float(mean))
    return out


def apply_plausible_range(
    values: pd.Series, plausible_range: tuple[float, float] | None
) -> tuple[pd.Series, int, int]:
    """Set non-finite values and values outside ``[low, high]`` to NaN.

    Returns
    -------
    (Series, int, int)
        float64 values, the number of infinite values and the number of finite values outside
        the range (NaN is missing and not counted).
    """
    x = pd.to_numeric(values, errors="coerce").astype(np.float64).to_numpy(copy=True)
    infinite = np.isinf(x)
    x[infinite] = np.nan
    implausible = np.zeros(len(x), dtype=bool)
    if plausible_range is not None:
        low, high = plausible_range
        with np.errstate(invalid="ignore"):
            implausible = ~np.isnan(x) & ((x < low) | (x > high))
        x[implausible] = np.nan
    return pd.Series(x, index=values.index, name=values.name), int(infinite.sum()), int(implausible.sum())


# --------------------------------------------------------------------------------------------
# report and the whole step
# --------------------------------------------------------------------------------------------


def _add_counts(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    out = dict(a)
    for key, value in b.items():
        out[key] = out.get(key, 0) + int(value)
    return dict(sorted(out.items()))


@dataclass
class HarmonizationReport:
    """What harmonization changed or could not use, per feature (site-local: counts may be small).

    Attributes
    ----------
    rows:
        Rows (persons) harmonized.
    unknown_unit:
        ``{feature: {unit code: rows}}``: measurement rows in the window whose unit has no
        conversion, by the unit's ``concept_code`` (from
        :func:`omopfl.features.unknown_unit_counts`; empty if not supplied).
    unknown_unit_rows:
        ``{feature: rows}``: the same rows summed from the per-person ``__unknown_unit`` columns.
    implausible:
        ``{feature: values}`` outside the study's range, set to NaN.
    non_finite:
        ``{feature: n}``: measurement rows with a NaN or +-inf value (not used by the query,
        ``__non_finite`` columns) plus feature values that were +-inf (set to NaN here).
    unmapped:
        ``{categorical feature: {value: rows}}`` matching no study level (all-zero one-hot).
    """

    rows: int = 0
    unknown_unit: dict[str, dict[str, int]] = field(default_factory=dict)
    unknown_unit_rows: dict[str, int] = field(default_factory=dict)
    implausible: dict[str, int] = field(default_factory=dict)
    non_finite: dict[str, int] = field(default_factory=dict)
    unmapped: dict[str, dict[str, int]] = field(default_factory=dict)

    def merge(self, other: HarmonizationReport) -> HarmonizationReport:
        """Sum of two reports (e.g. of two chunks of one site)."""
        def nested(a: dict[str, dict[str, int]], b: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
            return {k: _add_counts(a.get(k, {}), b.get(k, {})) for k in dict.fromkeys([*a, *b])}

        return HarmonizationReport(
            rows=self.rows + other.rows,
            unknown_unit=nested(self.unknown_unit, other.unknown_unit),
            unknown_unit_rows=_add_counts(self.unknown_unit_rows, other.unknown_unit_rows),
            implausible=_add_counts(self.implausible, other.implausible),
            non_finite=_add_counts(self.non_finite, other.non_finite),
            unmapped=nested(self.unmapped, other.unmapped),
        )

    def features(self) -> list[str]:
        names = [*self.unknown_unit, *self.unknown_unit_rows, *self.implausible, *self.non_finite, *self.unmapped]
        return list(dict.fromkeys(names))

    def to_dict(self) -> dict[str, Any]:
        """``{"rows": n, "features": {name: {unknown_unit, unknown_unit_rows, implausible, non_finite,
        unmapped}}}`` with every count present (zeros included)."""
        return {
            "rows": self.rows,
            "features": {
                name: {
                    "unknown_unit": dict(self.unknown_unit.get(name, {})),
                    "unknown_unit_rows": int(self.unknown_unit_rows.get(name, 0)),
                    "implausible": int(self.implausible.get(name, 0)),
                    "non_finite": int(self.non_finite.get(name, 0)),
                    "unmapped": dict(self.unmapped.get(name, {})),
                }
                for name in self.features()
            },
        }


def harmonize(
    frame: pd.DataFrame,
    study: StudyConfig,
    *,
    unknown_units: Mapping[str, Mapping[str, int]] | None = None,
) -> tuple[pd.DataFrame, HarmonizationReport]:
    """Harmonize a feature frame (or one chunk of it) as the module docstring describes.

    Parameters
    ----------
    frame:
        Columns of :func:`feature_columns` (extra columns are an error, missing ones too).
    study:
        The study: demographics, categories, measurement ranges.
    unknown_units:
        ``{feature: {unit code: rows}}`` from :func:`omopfl.features.unknown_unit_counts`, copied
        into the report (pass it once per site, not once per chunk).

    Returns
    -------
    (DataFrame, HarmonizationReport)
        The columns of :func:`harmonized_columns`, index reset; and the report.
    """
    expected = [c.name for c in feature_columns(study)]
    if list(frame.columns) != expected:
        missing = [c for c in expected if c not in frame.columns]
        extra = [c for c in frame.columns if c not in expected]
        raise ValueError(
            f"feature frame columns do not match the study (missing: {missing or 'none'}, extra: {extra or 'none'})"
        )
    frame = frame.reset_index(drop=True)
    report = HarmonizationReport(rows=len(frame))
    ranges = {m.name: m.plausible_range for m in study.measurements}
    out: dict[str, Any] = {}
    for spec in feature_columns(study):
        column = frame[spec.name]
        if spec.kind in ("id", "date", "label"):
            out[spec.name] = column
        elif spec.kind == "categorical":
            onehot, unmapped = align_categories(column, spec.levels, spec.name)
            out.update({name: onehot[name] for name in onehot.columns})
            report.unmapped[spec.name] = unmapped
        elif spec.kind == "numeric":
            values, non_finite, implausible = apply_plausible_range(column, ranges.get(spec.name))
            out[spec.name] = values
            report.non_finite[spec.name] = report.non_finite.get(spec.name, 0) + non_finite
            if spec.name in ranges:
                report.implausible[spec.name] = implausible
        elif spec.kind in ("binary", "count"):
            out[spec.name] = column.astype(np.int64)
        elif spec.kind == "unknown_unit":
            report.unknown_unit_rows[spec.feature or spec.name] = int(column.sum())
        else:  # non_finite rows the query left out
            key = spec.feature or spec.name
            report.non_finite[key] = report.non_finite.get(key, 0) + int(column.sum())
    result = add_missing_indicators(pd.DataFrame(out, index=frame.index),
                                    [m.name for m in missable_measurements(study)])
    for name, counts in (unknown_units or {}).items():
        report.unknown_unit[name] = dict(sorted((str(k), int(v)) for k, v in counts.items()))
    return result[[c.name for c in harmonized_columns(study)]], report


def harmonize_frame(
    frame: pd.DataFrame,
    study: StudyConfig,
    unknown_units: Mapping[str, Mapping[str, int]] | None = None,
) -> tuple[pd.DataFrame, list[str], dict[str, Any]]:
    """:func:`harmonize`, returning ``(frame, model feature names, report.to_dict())`` for pipelines.

    The feature names are :func:`model_feature_names` (``study.feature_names()`` plus the missing
    indicators), the model-input columns of the returned frame in order.
    """
    out, report = harmonize(frame, study, unknown_units=unknown_units)
    return out, model_feature_names(study), report.to_dict()
