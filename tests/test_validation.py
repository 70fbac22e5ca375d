"""Validation: Great Expectations on feature frames, OHDSI DQD-style checks on synthetic sites and Eunomia.

Frame checks run real Great Expectations (imported once per process, shared by every test);
CDM checks run as SQL on DuckDB and on PostgreSQL, on a small synthetic site (whose generator
planted the dirty rows it reports in its truth) and on OHDSI's Eunomia GiBleed with its real
defects (duplicate keys, observation periods of absent persons).
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from conftest import Site

from omopfl.db import qualified
from omopfl.errors import DataError
from omopfl.study import StudyConfig, load_study
from omopfl.validation import (
    FATAL,
    WARNING,
    CheckResult,
    ValidationReport,
    cdm_conformance,
    expectation_suite_for,
    run_expectations,
    validate,
)

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "examples" / "t2dm_hf" / "study.toml"
FIRST_PERSON_ID = 987_650_001  # distinctive: must never show up in a report or message
BAD_VALUE = 777.25  # an impossible lab value: must never show up either


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def study() -> StudyConfig:
    return load_study(STUDY)


def clean_frame(study: StudyConfig, n: int = 200, seed: int = 0) -> pd.DataFrame:
    """A plausible prepared feature frame: one row per person, every value in range."""
    rng = np.random.default_rng(seed)
    index = pd.Timestamp("2020-01-01") + pd.to_timedelta(rng.integers(0, 1000, n), unit="D")
    age = rng.integers(30, 90, n)
    frame = pd.DataFrame({
        "person_id": np.arange(FIRST_PERSON_ID, FIRST_PERSON_ID + n, dtype="int64"),
        "label": rng.integers(0, 2, n),
        "index_date": index,
        "birth_date": index - pd.to_timedelta(age * 365 + 30, unit="D"),
        "observation_period_start_date": index - pd.to_timedelta(rng.integers(365, 3000, n), unit="D"),
        "observation_period_end_date": index + pd.to_timedelta(rng.integers(1, 900, n), unit="D"),
        "age": age.astype("float64"),
    })
    male = rng.integers(0, 2, n)
    frame["sex_male"], frame["sex_female"] = male, 1 - male
    frame["prior_observation_days"] = (frame["index_date"] - frame["observation_period_start_date"]).dt.days
    for feature in study.concept_sets:
        frame[feature.name] = rng.poisson(2, n) if feature.aggregate == "count" else rng.integers(0, 2, n)
    for m in study.measurements:
        low, high = m.plausible_range
        values = rng.uniform(low + 0.1 * (high - low), high - 0.1 * (high - low), n)
        values[rng.random(n) < 0.2] = np.nan  # 80 % complete: above min_completeness (0.5)
        frame[m.name] = values
    return frame


def run_frame(study: StudyConfig, frame: pd.DataFrame) -> ValidationReport:
    suite = expectation_suite_for(study, study.feature_names(), columns=list(frame.columns))
    return ValidationReport(site="site_t", study=study.name, persons=len(frame),
                            results=run_expectations(suite, frame))


def failed(report: ValidationReport, check: str, field: str | None = None) -> list[CheckResult]:
    return [r for r in report.results if r.failed and r.check == check and (field is None or r.field == field)]


def only(results: list[CheckResult]) -> CheckResult:
    assert len(results) == 1, results
    return results[0]


def assert_no_ids_or_values(text: str) -> None:
    for person_id in range(FIRST_PERSON_ID, FIRST_PERSON_ID + 300):
        assert str(person_id) not in text
    assert "777" not in text


# ----------------------------------------------------------------------------- the suite
def test_suite_follows_the_study(study: StudyConfig) -> None:
    frame = clean_frame(study)
    suite = expectation_suite_for(study, study.feature_names(), columns=list(frame.columns))
    by_check: dict[str, list] = {}
    for expectation in suite.expectations:
        meta = expectation.meta["omopfl"]
        assert meta["level"] in {FATAL, WARNING}
        by_check.setdefault(meta["check"], []).append(expectation)
    ranges = {e.column: (e.min_value, e.max_value) for e in by_check["plausibleRange"]}
    for m in study.measurements:
        assert ranges[m.name] == m.plausible_range
    assert ranges["age"] == (0, 120)
    binary = {e.column for e in by_check["isBinary"]}
    assert binary == {"label", "sex_male", "sex_female", "hypertension", "chronic_kidney_disease", "metformin"}
    assert {e.column for e in by_check["plausibleValueLow"]} == {"statin_prescriptions", "prior_observation_days"}
    assert {e.column for e in by_check["measureValueCompleteness"]} == {m.name for m in study.measurements}
    # fatal_completeness = 0 in the example study: only the warning threshold is checked
    assert all(e.meta["omopfl"]["level"] == WARNING for e in by_check["measureValueCompleteness"])
    temporal = {(e.column_A, e.column_B) for e in by_check["plausibleTemporalAfter"]}
    assert temporal == {("index_date", "birth_date"), ("index_date", "observation_period_start_date"),
                        ("observation_period_end_date", "index_date")}
    # without the optional date columns, no date-order checks
    bare = expectation_suite_for(study, study.feature_names())
    assert not [e for e in bare.expectations if e.meta["omopfl"]["check"] == "plausibleTemporalAfter"]


def test_clean_frame_passes(study: StudyConfig, capfd: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture,
                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    caplog.set_level("INFO", logger="great_expectations")
    report = run_frame(study, clean_frame(study))
    assert report.fatal == [] and report.warnings == [], report.summary_text()
    assert report.ok
    assert len(report.results) > 40
    report.raise_if_fatal()
    assert "all checks passed" in report.summary_text()
    # ephemeral context: no gx/ folder or any other file; progress bars off: nothing on stderr
    assert list(tmp_path.iterdir()) == []
    assert not [r for r in caplog.records if "directory" in r.getMessage()]  # not even a temporary docs site
    err = capfd.readouterr().err
    assert "Calculating Metrics" not in err and "it/s" not in err
    assert err.strip() == ""


def test_nullable_and_integer_dtypes_are_numeric(study: StudyConfig) -> None:
    frame = clean_frame(study)
    frame["hba1c"] = frame["hba1c"].astype("Float64")
    frame["metformin"] = frame["metformin"].astype("Int64")
    frame.loc[3, "metformin"] = pd.NA
    frame["sex_male"] = frame["sex_male"].astype("int8")
    report = run_frame(study, frame)
    assert report.fatal == [] and report.warnings == [], report.summary_text()


def test_duplicate_person_is_fatal(study: StudyConfig) -> None:
    frame = clean_frame(study)
    frame = pd.concat([frame, frame.iloc[:3]], ignore_index=True)
    report = run_frame(study, frame)
    result = only(report.fatal)
    assert (result.check, result.field, result.level) == ("isPrimaryKey", "person_id", FATAL)
    assert (result.violated, result.total) == (6, 203)  # every row sharing a person_id
    assert not report.ok


def test_impossible_lab_values_are_range_warnings_with_counts(study: StudyConfig) -> None:
    frame = clean_frame(study)
    observed = frame.index[frame["hba1c"].notna()]
    frame.loc[observed[:4], "hba1c"] = BAD_VALUE
    frame.loc[observed[4:6], "hba1c"] = -1.0
    frame.loc[observed[6], "hba1c"] = np.inf
    frame.loc[observed[7:12], "hba1c"] = np.nan  # missing, not implausible
    frame.loc[frame.index[:2], "age"] = 130.0
    report = run_frame(study, frame)
    assert report.fatal == []
    hba1c = only(failed(report, "plausibleRange", "hba1c"))
    assert (hba1c.level, hba1c.violated, hba1c.total) == (WARNING, 7, 200)
    assert "[3, 20] %" in hba1c.description
    assert only(failed(report, "plausibleRange", "age")).violated == 2
    assert len(report.warnings) == 2  # completeness still above min_completeness
    assert report.ok
    report.raise_if_fatal()
    assert_no_ids_or_values(report.summary_text() + json.dumps(report.to_dict()))


def test_label_outside_0_1_is_fatal(study: StudyConfig) -> None:
    frame = clean_frame(study)
    frame.loc[5, "label"] = 2
    report = run_frame(study, frame)
    result = only(report.fatal)
    assert (result.check, result.field, result.violated, result.total) == ("isBinary", "label", 1, 200)
    with pytest.raises(DataError) as info:
        report.raise_if_fatal()
    message = str(info.value)
    assert "\n" not in message
    assert "features.label isBinary 1 of 200 rows (0.5%)" in message
    assert info.value.exit_code == 5
    assert_no_ids_or_values(message)


def test_binary_feature_and_null_keys_are_fatal(study: StudyConfig) -> None:
    frame = clean_frame(study)
    frame["label"] = frame["label"].astype("float64")
    frame.loc[[1, 2], "label"] = np.nan
    frame.loc[4, "metformin"] = 3
    frame.loc[7, "index_date"] = pd.NaT
    report = run_frame(study, frame)
    assert {(r.check, r.field, r.violated) for r in report.fatal} == {
        ("isRequired", "label", 2), ("isBinary", "metformin", 1), ("isRequired", "index_date", 1)}


def test_empty_frame_and_too_few_persons_are_fatal(study: StudyConfig) -> None:
    frame = clean_frame(study)
    empty = run_frame(study, frame.iloc[0:0])
    result = only(empty.fatal)
    assert (result.check, result.total, result.threshold) == ("minPersons", 0, 10.0)
    few = run_frame(study, frame.iloc[:5])
    result = only(few.fatal)
    assert (result.check, result.total) == ("minPersons", 5)
    with pytest.raises(DataError, match=r"features minPersons 5 rows; "):
        few.raise_if_fatal()
    few.raise_if_fatal(allow_fatal=True)  # the site's explicit override


def test_completeness_warning_and_fatal_thresholds(study: StudyConfig) -> None:
    strict = dataclasses.replace(
        study, validation=dataclasses.replace(study.validation, min_completeness=0.5, fatal_completeness=0.2))
    frame = clean_frame(study)
    frame.loc[frame.index[:120], "hba1c"] = np.nan  # at most 40 % observed: warning
    frame.loc[frame.index[:185], "ldl"] = np.nan  # at most 7.5 % observed: fatal
    report = run_frame(strict, frame)
    warning = only(failed(report, "measureValueCompleteness", "hba1c"))
    assert warning.level == WARNING and warning.violated == int(frame["hba1c"].isna().sum())
    assert warning.threshold == pytest.approx(50.0)
    fatal = only(failed(report, "measureValueCompleteness", "ldl"))  # the warning is replaced, not repeated
    assert fatal.level == FATAL and fatal.violated == int(frame["ldl"].isna().sum())
    assert [r.field for r in report.fatal] == ["ldl"]
    # the same frame under the example study's thresholds (fatal_completeness = 0): two warnings
    lenient = run_frame(study, frame)
    assert lenient.fatal == []
    assert {r.field for r in failed(lenient, "measureValueCompleteness")} == {"hba1c", "ldl"}


def test_missing_or_non_numeric_columns_are_fatal(study: StudyConfig) -> None:
    frame = clean_frame(study).drop(columns=["creatinine"])
    frame["bmi"] = frame["bmi"].map(lambda v: "n/a" if np.isnan(v) else f"{v:.1f}")
    report = run_frame(study, frame)
    assert {(r.check, r.field) for r in report.fatal} == {("hasColumn", "creatinine"), ("isNumeric", "bmi")}
    assert only(failed(report, "isNumeric")).description == "feature column is not numeric (dtype str)"
    assert not [r for r in report.results if "could not be evaluated" in r.description]


def test_dates_out_of_order_are_warnings(study: StudyConfig) -> None:
    frame = clean_frame(study)
    frame.loc[[0, 1], "birth_date"] = frame.loc[[0, 1], "index_date"] + pd.Timedelta(days=10)
    frame.loc[2, "observation_period_end_date"] = frame.loc[2, "index_date"] - pd.Timedelta(days=1)
    report = run_frame(study, frame)
    assert report.fatal == []
    assert sorted((r.field, r.violated) for r in failed(report, "plausibleTemporalAfter")) == [
        ("index_date", 2), ("observation_period_end_date", 1)]


def test_report_dict_summary_and_override(study: StudyConfig) -> None:
    frame = clean_frame(study)
    frame = pd.concat([frame, frame.iloc[:2]], ignore_index=True)
    frame.loc[0, "label"] = 2
    frame.loc[frame["hba1c"].notna(), "hba1c"] = BAD_VALUE
    report = run_frame(study, frame)
    assert len(report.fatal) == 2 and len(report.warnings) == 1
    data = report.to_dict()
    text = json.dumps(data)  # JSON-safe
    loaded = json.loads(text)
    assert (loaded["fatal_count"], loaded["warning_count"], loaded["passed_count"]) == (2, 1, len(report.passed))
    assert loaded["summary_text"] == report.summary_text() and loaded["ok"] is False
    allowed = (str, int, float, bool, type(None))
    for result in data["results"]:
        assert set(result) == {"source", "check", "table", "field", "level", "passed", "violated", "total",
                               "threshold", "description", "expectation", "percent"}
        assert all(isinstance(v, allowed) for v in result.values())
    assert [r["level"] for r in data["results"][:3]] == [FATAL, FATAL, WARNING]  # failures first, fatal first
    summary = report.summary_text()
    lines = summary.splitlines()
    assert lines[0].startswith("Validation of site site_t, study t2dm_heart_failure") and "2 fatal" in lines[0]
    assert [line.split()[0] for line in lines[2:5]] == ["FATAL", "FATAL", "WARNING"]
    assert_no_ids_or_values(text + summary)
    with pytest.raises(DataError) as info:
        report.raise_if_fatal()
    message = str(info.value)
    assert "\n" not in message and "2 fatal check(s)" in message
    assert "isPrimaryKey" in message and "isBinary" in message and "hba1c" not in message
    assert_no_ids_or_values(message)
    report.raise_if_fatal(allow_fatal=True)
    report.allow_fatal = True  # the site's TOML says so
    assert report.ok
    report.raise_if_fatal()
    assert "overridden" in report.summary_text()


# ----------------------------------------------------------------------------- CDM checks in the database


def by_key(results: list[CheckResult]) -> dict[tuple[str, str, str | None], CheckResult]:
    return {(r.check, r.table, r.field): r for r in results}


def test_cdm_checks_on_synthetic_site(synth_site: Site, study: StudyConfig) -> None:
    with synth_site.engine.connect() as conn:
        results = cdm_conformance(conn, synth_site.config, study=study)
    report = ValidationReport(site="site_a", results=results)
    assert report.fatal == [], report.summary_text()
    checks = by_key(results)
    dirty = synth_site.truth["dirty_rows"]
    rows = synth_site.truth["rows"]
    for table, start in (("condition_occurrence", "condition_start_date"),
                         ("drug_exposure", "drug_exposure_start_date"), ("measurement", "measurement_date")):
        outside = checks["withinObservationPeriod", table, start]
        assert outside.violated == dirty["outside_observation_period"][table] > 0
        assert outside.total == rows[table] and outside.level == WARNING and outside.failed
        concept = {"condition_occurrence": "condition_concept_id", "drug_exposure": "drug_concept_id",
                   "measurement": "measurement_concept_id"}[table]
        unmapped = checks["standardConceptRecordCompleteness", table, concept]
        assert unmapped.violated == dirty["unmapped_concept"][table] > 0 and unmapped.level == WARNING
    expected_warnings = {(c, t) for c in ("withinObservationPeriod", "standardConceptRecordCompleteness")
                         for t in ("condition_occurrence", "drug_exposure", "measurement")}
    assert {(r.check, r.table) for r in report.warnings} == expected_warnings
    # the clean parts pass, with their counts
    assert checks["isPrimaryKey", "person", "person_id"].passed
    assert checks["isRequired", "person", "year_of_birth"].total == rows["person"]
    assert checks["isForeignKey", "observation_period", "person_id"].violated == 0
    assert checks["measurePersonCompleteness", "observation_period", None].violated == 0
    for table in ("observation_period", "visit_occurrence", "condition_occurrence", "drug_exposure"):
        assert next(r for r in results if r.check == "plausibleStartBeforeEnd" and r.table == table).passed
    for check in ("plausibleAfterBirth", "plausibleBeforeDeath", "measureObservationPeriodOverlap",
                  "valueWithoutUnit", "cdmTable", "cdmField"):
        assert [r for r in results if r.check == check], check  # every kind of check ran
    assert not [r for r in results if "could not run" in r.description]


def test_cdm_checks_on_eunomia_report_defects_as_warnings(eunomia_site: Site, study: StudyConfig) -> None:
    with eunomia_site.engine.connect() as conn:
        results = cdm_conformance(conn, eunomia_site.config, study=study)
        duplicates = {}
        for table in ("drug_exposure", "measurement", "observation"):
            key = f"{table}_id"
            # issue 15: the number of key values held by more than one row (as `sites check`), not the rows
            duplicates[table] = conn.execute(sa.text(
                f"SELECT count(*) FROM (SELECT {key} FROM {qualified('cdm', table)} "
                f"GROUP BY {key} HAVING count(*) > 1) d")).scalar_one()
    report = ValidationReport(site="eunomia", results=results)
    assert report.fatal == [], report.summary_text()
    assert not [r for r in results if "could not" in r.description]
    checks = by_key(results)
    for table, count in duplicates.items():
        result = checks["isPrimaryKey", table, f"{table}_id"]
        assert result.failed and result.level == WARNING and result.violated == count > 0
    orphans = checks["isForeignKey", "observation_period", "person_id"]
    assert orphans.failed and orphans.level == WARNING
    assert orphans.violated == eunomia_site.eunomia.observation_periods_without_person > 0
    assert checks["isPrimaryKey", "person", "person_id"].passed
    # Eunomia is CDM 5.3: procedure_occurrence has no end date, and none was asked for
    assert ("plausibleStartBeforeEnd", "procedure_occurrence", "procedure_date") not in checks
    assert_no_ids_or_values(json.dumps(report.to_dict()))


def test_missing_required_table_is_fatal(synth_site: Site, study: StudyConfig) -> None:
    """A schema holding a partial CDM: absent tables are results, the rest is still checked."""
    schema = f"partial_{uuid.uuid4().hex[:6]}"
    source = synth_site.config.cdm_schema
    with synth_site.engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        for table in ("observation_period", "condition_occurrence", "concept", "concept_ancestor"):
            conn.execute(sa.text(
                f"CREATE TABLE {qualified(schema, table)} AS SELECT * FROM {qualified(source, table)}"))
        # a needed table whose start date is stored as a year number: the checks on it cannot run
        conn.execute(sa.text(f"CREATE TABLE {qualified(schema, 'drug_exposure')} AS SELECT person_id, "
                             "drug_exposure_id, drug_concept_id, drug_type_concept_id, drug_exposure_end_date, "
                             "CAST(EXTRACT(YEAR FROM drug_exposure_start_date) AS INTEGER) AS drug_exposure_start_date "
                             f"FROM {qualified(source, 'drug_exposure')}"))
    site = dataclasses.replace(synth_site.config, cdm_schema=schema, vocabulary_schema=schema)
    try:
        with synth_site.engine.connect() as conn:
            results = cdm_conformance(conn, site, "5.4", study=study)
        report = ValidationReport(site="partial", results=results)
        fatal = {(r.check, r.table) for r in report.fatal}
        assert ("cdmTable", "person") in fatal and ("cdmTable", "measurement") in fatal  # the study reads both
        assert ("cdmTable", "visit_occurrence") not in fatal
        # a table the study never reads: its absence is not even a warning (issue 13) ...
        assert ("cdmTable", "visit_occurrence") not in {(r.check, r.table) for r in report.results}
        with synth_site.engine.connect() as conn:  # ... but it is for the CDM checks without a study
            alone = ValidationReport(site="partial", results=cdm_conformance(conn, site, "5.4"))
        assert ("cdmTable", "visit_occurrence") in {(r.check, r.table) for r in alone.warnings}
        checks = by_key(results)
        assert checks["isRequired", "observation_period", "person_id"].passed  # checked all the same
        assert checks["withinObservationPeriod", "condition_occurrence", "condition_start_date"].violated == \
            synth_site.truth["dirty_rows"]["outside_observation_period"]["condition_occurrence"]
        broken = [r for r in results if r.table == "drug_exposure" and "could not run" in r.description]
        assert broken and all(r.failed and r.violated is None for r in broken)
        with pytest.raises(DataError) as info:
            report.raise_if_fatal()
        assert "\n" not in str(info.value) and "person cdmTable" in str(info.value)
    finally:
        with synth_site.engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))


def test_validate_combines_cdm_and_frame(synth_site: Site, study: StudyConfig, capfd: pytest.CaptureFixture,
                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    frame = clean_frame(study, n=144)
    with synth_site.engine.connect() as conn:
        report = validate(conn, synth_site.config, study, frame)
    assert report.cdm_version == "5.4" and report.persons == 144 and report.study == study.name
    assert {r.source for r in report.results} == {"cdm", "expectation"}
    assert report.fatal == [] and report.ok
    assert {r.source for r in report.warnings} == {"cdm"}  # the planted dirty rows
    report.raise_if_fatal()
    json.dumps(report.to_dict())
    assert list(tmp_path.iterdir()) == []
    assert "Calculating Metrics" not in capfd.readouterr().err

    bad = frame.copy()
    bad.loc[0, "label"] = 2
    with synth_site.engine.connect() as conn:
        report = validate(conn, synth_site.config, study, bad, "5.4")
    assert [(r.source, r.check) for r in report.fatal] == [("expectation", "isBinary")]
    with pytest.raises(DataError):
        report.raise_if_fatal()
    allowed = dataclasses.replace(study, validation=dataclasses.replace(study.validation, allow_fatal=True))
    with synth_site.engine.connect() as conn:
        report = validate(conn, synth_site.config, allowed, bad, "5.4")
    assert report.fatal and report.ok
    report.raise_if_fatal()
