"""Harmonization without a database: unit table, categories, ranges, missing values, purity."""

from __future__ import annotations

import ast
import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import omopfl.harmonize as harmonize_module
from omopfl import vocab
from omopfl.harmonize import (
    ANALYTE_ALIASES,
    ANALYTES,
    DIMENSIONS,
    HarmonizationReport,
    Scaler,
    add_missing_indicators,
    align_categories,
    apply_plausible_range,
    conversion,
    conversions_to,
    feature_columns,
    harmonize,
    harmonize_frame,
    harmonized_columns,
    impute,
    model_feature_names,
)
from omopfl.moments import Moments, merge
from omopfl.study import load_study

ROOT = Path(__file__).resolve().parents[1]
STUDY = load_study(ROOT / "examples" / "t2dm_hf" / "study.toml")


def _close(a: float, b: float, rel: float = 1e-12) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=rel)


# ----------------------------------------------------------------------------- unit table
@pytest.mark.parametrize("analyte", [*ANALYTES, None])
def test_round_trip_of_every_pair(analyte: str | None) -> None:
    families = ([ANALYTES[analyte]] if analyte else []) + list(DIMENSIONS.values())
    x = np.array([-3.5, 0.0, 1.0, 7.25, 123.456])
    for family in families:
        for a in family.to_canonical:
            for b in family.to_canonical:
                forward, back = conversion(analyte, a, b), conversion(analyte, b, a)
                assert forward is not None and back is not None, (a, b)
                y = forward[0] * x + forward[1]
                np.testing.assert_allclose(back[0] * y + back[1], x, rtol=1e-12, atol=1e-12)


def test_known_values() -> None:
    def convert(analyte: str | None, value: float, a: str, b: str) -> float:
        factor, offset = conversion(analyte, a, b)
        return factor * value + offset

    assert conversion("glucose", "mmol/L", "mg/dL") == (18.016, 0.0)  # exactly the generator's factor
    assert _close(convert("glucose", 99.088, "mg/dL", "mmol/L"), 5.5)
    assert _close(convert("creatinine", 88.42, "umol/L", "mg/dL"), 1.0)
    assert _close(convert("creatinine", 1.0, "mg/dL", "umol/L"), 88.42)
    assert _close(convert("hba1c", 6.5, "%", "mmol/mol"), 10.929 * (6.5 - 2.15))
    assert _close(convert("hba1c", 48.0, "mmol/mol", "%"), 48.0 / 10.929 + 2.15)
    assert _close(convert("ldl", 3.0, "mmol/L", "mg/dL"), 3.0 * 38.67)
    assert _close(convert("hdl", 38.67, "mg/dL", "mmol/L"), 1.0)
    assert _close(convert("triglycerides", 1.0, "mmol/L", "mg/dL"), 88.57)
    assert _close(convert(None, 10.0, "[lb_av]", "kg"), 4.5359237)
    assert _close(convert(None, 2500.0, "g", "kg"), 2.5)
    assert _close(convert(None, 72.0, "[in_i]", "cm"), 182.88)
    assert _close(convert(None, 1.8, "m", "cm"), 180.0)
    assert _close(convert(None, 98.6, "[degF]", "Cel"), 37.0)
    assert _close(convert("glucose", 1.0, "g/L", "mg/dL"), 100.0)  # analyte-independent route works too


def test_identity_and_unknown_pairs() -> None:
    assert conversion("glucose", "mg/dL", "mg/dL") == (1.0, 0.0)
    assert conversion(None, "kg/m2", "kg/m2") == (1.0, 0.0)
    assert conversion(None, "whatever", "whatever") == (1.0, 0.0)
    assert conversion(None, "mmol/L", "mg/dL") is None  # molar <-> mass needs the analyte
    assert conversion("glucose", "%", "mg/dL") is None
    assert conversion("glucose", "mg/dL", "mmol/mol") is None
    assert conversion("hba1c", "mg/dL", "%") is None
    assert conversion(None, "kg", "cm") is None
    assert conversion("potassium", "mmol/L", "mg/dL") is None  # unknown analyte: no molar mass
    assert conversion("potassium", "mmol/L", "umol/L") == (1000.0, 0.0)  # but molar <-> molar is fine
    assert conversion("glucose", "mg/dl", "mg/dL") is None  # UCUM codes are case-sensitive


def test_aliases_and_conversions_to() -> None:
    for alias, analyte in ANALYTE_ALIASES.items():
        assert conversion(alias, "mmol/L", "mg/dL") == conversion(analyte, "mmol/L", "mg/dL") or analyte == "hba1c"
    table = conversions_to("glucose", "mg/dL")
    assert table["mg/dL"] == (1.0, 0.0)
    assert table["mmol/L"] == (18.016, 0.0)
    assert "%" not in table
    assert conversions_to(None, "kg")["[lb_av]"] == (0.45359237, 0.0)
    assert conversions_to(None, "made-up-unit") == {"made-up-unit": (1.0, 0.0)}
    for unit, pair in conversions_to("hba1c", "mmol/mol").items():
        assert pair == conversion("hba1c", unit, "mmol/mol")


def test_agrees_with_the_generator() -> None:
    """Every unit the synthetic generator writes converts back to its canonical unit exactly."""
    for key, lab in vocab.LABS.items():
        canonical = vocab.UNITS[lab.canonical_unit]
        for unit_id, (a, b) in lab.conversions.items():
            pair = conversion(key, vocab.UNITS[unit_id], canonical)
            assert pair is not None, (key, unit_id)
            factor, offset = pair
            # generator: stored = a * canonical + b; harmonizer: canonical = factor * stored + offset
            assert _close(factor * a, 1.0, 1e-15), (key, unit_id)
            assert _close(factor * b + offset, 0.0, 1e-13), (key, unit_id)
        analyte = harmonize_module.canonical_analyte(key)
        if analyte is not None:
            assert ANALYTES[analyte].canonical == canonical
    for measurement in STUDY.measurements:  # every study unit is a canonical or known unit
        assert len(conversions_to(measurement.analyte, measurement.unit)) > 1 or measurement.unit == "kg/m2"


# ----------------------------------------------------------------------------- steps
def test_categories_fixed_by_the_study() -> None:
    onehot, unmapped = align_categories(pd.Series(["male", "Male ", "male"]), ("male", "female"), "sex")
    assert list(onehot.columns) == ["sex_male", "sex_female"]
    assert onehot["sex_female"].tolist() == [0, 0, 0]  # a site without women still has the column
    assert onehot["sex_male"].tolist() == [1, 1, 1]
    assert unmapped == {}
    onehot, unmapped = align_categories(["female", "other", None, "x", "other"], ("male", "female"), "sex")
    assert onehot.to_numpy().tolist() == [[0, 1], [0, 0], [0, 0], [0, 0], [0, 0]]
    assert unmapped == {"<none>": 1, "other": 2, "x": 1}
    with pytest.raises(ValueError):
        align_categories(["a"], ("a", "A"), "x")


def test_missing_indicators_and_imputation_with_federated_means() -> None:
    frame = pd.DataFrame({"a": [1.0, np.nan, 3.0], "b": [np.nan, np.nan, 5.0], "c": [1, 2, 3]})
    with_flags = add_missing_indicators(frame, ["a", "b"])
    assert list(with_flags.columns) == ["a", "b", "c", "a__missing", "b__missing"]
    assert with_flags["a__missing"].tolist() == [0, 1, 0]
    assert with_flags["b__missing"].tolist() == [1, 1, 0]
    assert frame.columns.tolist() == ["a", "b", "c"]  # input untouched
    # means from two "sites", merged: the imputed value is the global mean, not the local one
    site_1 = Moments.from_array(np.array([[1.0, 5.0], [3.0, np.nan]]), ["a", "b"])
    site_2 = Moments.from_array(np.array([[8.0, 7.0]]), ["a", "b"])
    scaler = Scaler.from_moments(merge(site_1, site_2))
    filled = impute(with_flags, scaler)
    assert filled["a"].tolist() == [1.0, 4.0, 3.0]
    assert filled["b"].tolist() == [6.0, 6.0, 5.0]
    assert filled["a__missing"].tolist() == [0, 1, 0]
    assert impute(with_flags, {"a": 0.5})["a"].tolist() == [1.0, 0.5, 3.0]
    with pytest.raises(KeyError):
        impute(with_flags, {"zzz": 1.0})
    with pytest.raises(ValueError):
        impute(with_flags, {"a": float("nan")})
    with pytest.raises(KeyError):
        add_missing_indicators(frame, ["zzz"])


def test_plausible_range_and_non_finite() -> None:
    values = pd.Series([50.0, np.inf, 5000.0, np.nan, -np.inf, 20.0, 1000.0, 19.99])
    out, non_finite, implausible = apply_plausible_range(values, (20.0, 1000.0))
    assert (non_finite, implausible) == (2, 2)
    np.testing.assert_array_equal(out.to_numpy(), [50.0, np.nan, np.nan, np.nan, np.nan, 20.0, 1000.0, np.nan])
    out, non_finite, implausible = apply_plausible_range(values, None)
    assert (non_finite, implausible) == (2, 0)


def _raw_frame(n: int, rng: np.random.Generator) -> pd.DataFrame:
    """A frame shaped like omopfl.features output for the synthetic study."""
    data: dict[str, object] = {}
    for spec in feature_columns(STUDY):
        if spec.kind == "id":
            data[spec.name] = np.arange(1, n + 1, dtype=np.int64)
        elif spec.kind == "date":
            data[spec.name] = pd.to_datetime(["2020-01-01"] * n)
        elif spec.kind in ("label", "binary"):
            data[spec.name] = rng.integers(0, 2, n)
        elif spec.kind in ("count", "unknown_unit", "non_finite"):
            data[spec.name] = rng.integers(0, 3, n)
        elif spec.kind == "categorical":
            data[spec.name] = np.array(["male"] * n, dtype=object)
        else:
            data[spec.name] = rng.normal(100.0, 10.0, n)
    return pd.DataFrame(data)


def test_harmonize_a_frame() -> None:
    rng = np.random.default_rng(3)
    raw = _raw_frame(40, rng)
    raw.loc[0, "glucose"] = 5000.0  # impossible
    raw.loc[1, "glucose"] = np.inf
    raw.loc[2, "glucose"] = np.nan
    raw.loc[3, "sex"] = "other"
    out, report = harmonize(raw, STUDY, unknown_units={"glucose": {"%": 2}})
    assert list(out.columns) == [c.name for c in harmonized_columns(STUDY)]
    assert model_feature_names(STUDY) == [*STUDY.feature_names(), *(f"{m.name}__missing" for m in STUDY.measurements)]
    assert not any(c.endswith(("__unknown_unit", "__non_finite")) for c in out.columns)
    assert out["glucose"].iloc[:3].isna().all()
    assert out["glucose__missing"].iloc[:4].tolist() == [1, 1, 1, 0]
    assert out["sex_female"].sum() == 0 and out["sex_male"].sum() == 39
    summary = report.to_dict()
    glucose = summary["features"]["glucose"]
    g = raw["glucose"].to_numpy()
    assert glucose["implausible"] == int((np.isfinite(g) & ((g < 20) | (g > 1000))).sum()) >= 1
    assert glucose["non_finite"] == 1 + int(raw["glucose__non_finite"].sum())
    assert glucose["unknown_unit"] == {"%": 2}
    assert glucose["unknown_unit_rows"] == int(raw["glucose__unknown_unit"].sum())
    assert summary["features"]["sex"]["unmapped"] == {"other": 1}
    assert summary["rows"] == 40
    # bmi's range is [10, 80]: values drawn around 100 are implausible
    assert summary["features"]["bmi"]["implausible"] == int(((raw["bmi"] < 10) | (raw["bmi"] > 80)).sum())

    # two chunks harmonized separately and merged give the same frame and report
    first, r1 = harmonize(raw.iloc[:15], STUDY)
    second, r2 = harmonize(raw.iloc[15:], STUDY, unknown_units={"glucose": {"%": 2}})
    pd.testing.assert_frame_equal(pd.concat([first, second], ignore_index=True), out)
    assert r1.merge(r2).to_dict() == summary
    assert HarmonizationReport().merge(report).to_dict() == summary

    frame, names, as_dict = harmonize_frame(raw, STUDY, {"glucose": {"%": 2}})
    pd.testing.assert_frame_equal(frame, out)
    assert names == model_feature_names(STUDY) and as_dict == summary
    with pytest.raises(ValueError, match="columns"):
        harmonize(raw.drop(columns=["glucose"]), STUDY)


def test_harmonize_follows_the_study_levels() -> None:
    study = dataclasses.replace(STUDY, categories={"sex": ("female", "male", "other")})
    raw = _raw_frame(5, np.random.default_rng(0))
    raw.loc[0, "sex"] = "other"
    out, report = harmonize(raw, study)
    assert [c for c in out.columns if c.startswith("sex_")] == ["sex_female", "sex_male", "sex_other"]
    assert out["sex_other"].tolist() == [1, 0, 0, 0, 0]
    assert report.unmapped["sex"] == {}


# ----------------------------------------------------------------------------- purity
def test_harmonize_is_pure() -> None:
    tree = ast.parse(Path(harmonize_module.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    third_party = {name.split(".")[0] for name in imported if not name.startswith("omopfl")}
    assert third_party <= {"__future__", "math", "collections", "dataclasses", "typing", "numpy", "pandas"}
    # omopfl.units: the UCUM factors (standard library at import; ucumvert only to fill its cache)
    assert {name for name in imported if name.startswith("omopfl")} <= {"omopfl.moments", "omopfl.study",
                                                                         "omopfl.units"}
    code = ("import sys, omopfl.harmonize; "
            "print(sorted(m for m in ('sqlalchemy', 'flwr', 'torch', 'pydicom', 'great_expectations') "
            "if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
