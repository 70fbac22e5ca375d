"""Features from every clinical domain on a tiny hand-made CDM, on DuckDB and PostgreSQL.

Observation values (``value_as_number``, every aggregate), unitless values, categoricals from
``value_as_concept_id`` (levels fixed by the study, an explicit ``other``, no value), visits and
condition/drug eras.  Four persons, every row written below; the expected values are worked out by
hand in the comments.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from omopfl.cdm import cdm_metadata, create_cdm, create_results, results_metadata
from omopfl.config import SiteConfig
from omopfl.errors import ConfigError
from omopfl.features import read_features
from omopfl.harmonize import harmonize, harmonized_columns, model_feature_names
from omopfl.study import load_study

ROOT = Path(__file__).resolve().parents[1]
TARGET, OUTCOME = 1, 2
INDEX = date(2020, 6, 1)
SMOKING, SCORE, INR, GLUCOSE = 43054909, 40771103, 3032080, 3004501  # question / score / lab concepts
CURRENT, FORMER, NEVER, ODD = 45881517, 45883458, 45879404, 999999  # value concepts (ODD: in no level)
MG_DL, PERCENT, SCORE_UNIT = 8840, 8554, 44777566  # UCUM mg/dL, %, {score}
T2DM, METFORMIN, INPATIENT, OUTPATIENT = 201826, 1503297, 9201, 9202

STUDY_TOML = f"""
[study]
name = "domains"

[cohorts]
target = "{ROOT / 'cohorts' / 'incident_t2dm.yaml'}"
outcome = "{ROOT / 'cohorts' / 'heart_failure.yaml'}"

[features]
demographics = ["sex"]

[[features.concept_sets]]
name = "inpatient_visits"
domain = "visit"
concepts = [{INPATIENT}]
aggregate = "count"

[[features.concept_sets]]
name = "t2dm_eras"
domain = "condition_era"
concepts = [{T2DM}]
aggregate = "count"

[[features.concept_sets]]
name = "metformin_era"
domain = "drug_era"
concepts = [{METFORMIN}]

[[features.measurements]]
name = "score_last"
domain = "observation"
concepts = [{SCORE}]
unit = "1"

[[features.measurements]]
name = "score_mean"
domain = "observation"
concepts = [{SCORE}]
unit = "1"
aggregate = "mean"

[[features.measurements]]
name = "score_min"
domain = "observation"
concepts = [{SCORE}]
unit = "1"
aggregate = "min"

[[features.measurements]]
name = "score_max"
domain = "observation"
concepts = [{SCORE}]
unit = "1"
aggregate = "max"

[[features.measurements]]
name = "score_n"
domain = "observation"
concepts = [{SCORE}]
unit = "1"
aggregate = "count"

[[features.measurements]]
name = "inr"
concepts = [{INR}]
unit = "1"

[[features.measurements]]
name = "glucose"
concepts = [{GLUCOSE}]
unit = "mg/dL"
analyte = "glucose"

[[features.categoricals]]
name = "smoking"
domain = "observation"
concepts = [{SMOKING}]
levels = {{ current = [{CURRENT}], former = [{FORMER}], never = [{NEVER}] }}
"""


def _write_study(tmp_path: Path, text: str = STUDY_TOML):
    path = tmp_path / "study.toml"
    path.write_text(text)
    return load_study(path)


def _tiny_cdm(conn: sa.Connection) -> None:
    create_cdm(conn, "cdm")
    create_results(conn, "results")
    meta = cdm_metadata("cdm", "cdm")
    results = results_metadata("results")

    def put(table: str, rows: list[dict], metadata: sa.MetaData = meta, schema: str = "cdm") -> None:
        conn.execute(metadata.tables[f"{schema}.{table}"].insert(), rows)

    put("concept", [dict(concept_id=c, concept_name=code, domain_id="Unit", vocabulary_id="UCUM",
                         concept_class_id="Unit", standard_concept="S", concept_code=code,
                         valid_start_date=date(1970, 1, 1), valid_end_date=date(2099, 12, 31))
                    for c, code in ((MG_DL, "mg/dL"), (PERCENT, "%"), (SCORE_UNIT, "{score}"))])
    put("person", [dict(person_id=p, gender_concept_id=8507 if p % 2 else 8532, year_of_birth=1960,
                        race_concept_id=0, ethnicity_concept_id=0) for p in (1, 2, 3, 4)])
    put("cohort", [dict(cohort_definition_id=TARGET, subject_id=p, cohort_start_date=INDEX, cohort_end_date=INDEX)
                   for p in (1, 2, 3, 4)], results, "results")
    obs = []

    def o(p: int, concept: int, day: date, number: float | None = None, value: int | None = None,
          unit: int | None = None) -> None:
        obs.append(dict(observation_id=len(obs) + 1, person_id=p, observation_concept_id=concept,
                        observation_date=day, observation_type_concept_id=32817, value_as_number=number,
                        value_as_concept_id=value, unit_concept_id=unit))

    # smoking: p1 former then current on 2020-05-01 (same day: the higher observation_id, current, is last),
    # never after index (outside the window); p2 a value in no level (other), a NULL and a 0 value later
    # (ignored); p3 never, but two years before index (outside [-365, 0]): no value; p4 nothing.
    o(1, SMOKING, date(2020, 1, 1), value=FORMER)
    o(1, SMOKING, date(2020, 5, 1), value=FORMER)
    o(1, SMOKING, date(2020, 5, 1), value=CURRENT)
    o(1, SMOKING, date(2020, 7, 1), value=NEVER)
    o(2, SMOKING, date(2020, 3, 1), value=ODD)
    o(2, SMOKING, date(2020, 4, 1), value=None)
    o(2, SMOKING, date(2020, 4, 2), value=0)
    o(3, SMOKING, date(2018, 6, 1), value=NEVER)
    # questionnaire score (unitless): p1 10, 14, 12 (no unit) -> last 12, mean 12, min 10, max 14, n 3;
    # p2 7 in {score} then 9 in mg/dL (unknown unit, not used) -> 7 everywhere, n 1; p3 only outside the window.
    o(1, SCORE, date(2020, 2, 1), number=10)
    o(1, SCORE, date(2020, 4, 1), number=14, unit=0)
    o(1, SCORE, date(2020, 5, 15), number=12)
    o(2, SCORE, date(2020, 5, 1), number=7, unit=SCORE_UNIT)
    o(2, SCORE, date(2020, 5, 2), number=9, unit=MG_DL)
    o(3, SCORE, date(2019, 1, 1), number=20)
    put("observation", obs)
    # INR (unitless measurement): p1 1.1 with unit 0, p2 2.5 with no unit, p3 30 % (unknown unit).
    # glucose in mg/dL: p1 recorded without a unit only (unknown), p2 100 mg/dL.
    put("measurement", [dict(measurement_id=i, person_id=p, measurement_concept_id=c, measurement_date=d,
                             measurement_type_concept_id=32856, value_as_number=v, unit_concept_id=u)
                        for i, (p, c, d, v, u) in enumerate([
                            (1, INR, date(2020, 5, 1), 1.1, 0), (2, INR, date(2020, 5, 1), 2.5, None),
                            (3, INR, date(2020, 5, 1), 30.0, PERCENT), (1, GLUCOSE, date(2020, 5, 1), 99.0, None),
                            (2, GLUCOSE, date(2020, 5, 1), 100.0, MG_DL)], start=1)])
    # visits: p1 two inpatient in the window and one long before; p2 outpatient only; p4 inpatient on index day.
    put("visit_occurrence", [dict(visit_occurrence_id=i, person_id=p, visit_concept_id=c, visit_start_date=d,
                                  visit_end_date=d, visit_type_concept_id=32817)
                             for i, (p, c, d) in enumerate([
                                 (1, INPATIENT, date(2020, 1, 10)), (1, INPATIENT, date(2020, 3, 10)),
                                 (1, INPATIENT, date(2015, 1, 1)), (2, OUTPATIENT, date(2020, 3, 10)),
                                 (4, INPATIENT, INDEX)], start=1)])
    # condition eras: p1 two starting in the window; p2 one starting before it (ends inside: not counted).
    put("condition_era", [dict(condition_era_id=i, person_id=p, condition_concept_id=T2DM,
                               condition_era_start_date=s, condition_era_end_date=e, condition_occurrence_count=1)
                          for i, (p, s, e) in enumerate([
                              (1, date(2019, 8, 1), date(2019, 9, 1)), (1, date(2020, 3, 1), date(2020, 6, 1)),
                              (2, date(2018, 1, 1), date(2020, 5, 1))], start=1)])
    # drug eras: p3 metformin from the day before index; p1 one after index (outside).
    put("drug_era", [dict(drug_era_id=1, person_id=3, drug_concept_id=METFORMIN, drug_era_start_date=date(2020, 5, 31),
                          drug_era_end_date=date(2020, 8, 1), drug_exposure_count=2, gap_days=0),
                     dict(drug_era_id=2, person_id=1, drug_concept_id=METFORMIN, drug_era_start_date=date(2020, 6, 2),
                          drug_era_end_date=date(2020, 8, 1), drug_exposure_count=1, gap_days=0)])


SITE = SiteConfig(name="tiny", url_env=None, cdm_schema="cdm", vocabulary_schema="cdm", results_schema="results")


def test_every_domain_against_hand_computed_truth(backend, tmp_path: Path) -> None:
    study = _write_study(tmp_path)
    with backend.engine.begin() as conn:
        _tiny_cdm(conn)
    with backend.engine.connect() as conn:
        features = read_features(conn, SITE, study, TARGET, OUTCOME)
    f = features.frame.set_index("person_id")
    assert list(f.index) == [1, 2, 3, 4]
    assert f["inpatient_visits"].tolist() == [2, 0, 0, 1]
    assert f["t2dm_eras"].tolist() == [2, 0, 0, 0]
    assert f["metformin_era"].tolist() == [0, 0, 1, 0]
    nan = np.nan
    np.testing.assert_allclose(f["score_last"], [12, 7, nan, nan])
    np.testing.assert_allclose(f["score_mean"], [12, 7, nan, nan])
    np.testing.assert_allclose(f["score_min"], [10, 7, nan, nan])
    np.testing.assert_allclose(f["score_max"], [14, 7, nan, nan])
    assert f["score_n"].tolist() == [3, 1, 0, 0] and f["score_n"].dtype == np.int64
    assert f["score_last__unknown_unit"].tolist() == [0, 1, 0, 0]
    np.testing.assert_allclose(f["inr"], [1.1, 2.5, nan, nan])
    assert f["inr__unknown_unit"].tolist() == [0, 0, 1, 0]
    np.testing.assert_allclose(f["glucose"], [nan, 100, nan, nan])
    assert features.unknown_units["glucose"] == {"<none>": 1}
    assert features.unknown_units["inr"] == {"%": 1}
    assert f["smoking"].tolist()[:2] == ["current", "other"] and f["smoking"].isna().tolist() == [0, 0, 1, 1]

    frame, report = harmonize(features.frame, study, unknown_units=features.unknown_units)
    h = frame.set_index("person_id")
    assert list(frame.columns) == [c.name for c in harmonized_columns(study)]
    onehot = h[["smoking_current", "smoking_former", "smoking_never", "smoking_other"]].to_numpy().tolist()
    assert onehot == [[1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert report.unmapped["smoking"] == {"<none>": 2}
    names = model_feature_names(study)
    # missing indicators only for value features that can be missing: not counts, presences, one-hot
    assert [n for n in names if n.endswith("__missing")] == [
        "score_last__missing", "score_mean__missing", "score_min__missing", "score_max__missing", "inr__missing",
        "glucose__missing"]
    assert h["inr__missing"].tolist() == [0, 0, 1, 1]


def test_unitless_only_rows_of_a_real_unit_are_warned(backend, tmp_path: Path) -> None:
    from omopfl.prepare import unit_warnings

    study = _write_study(tmp_path)
    with backend.engine.begin() as conn:
        _tiny_cdm(conn)
        # p2's glucose gone: the feature now has only a row without unit
        conn.execute(sa.text("DELETE FROM cdm.measurement WHERE person_id = 2 AND measurement_concept_id = :c"),
                     {"c": GLUCOSE})
    with backend.engine.connect() as conn:
        features = read_features(conn, SITE, study, TARGET, OUTCOME)
    warnings = unit_warnings(study, features.frame, features.unknown_units)
    assert len(warnings) == 1 and "glucose" in warnings[0] and "mg/dL" in warnings[0]


def test_categorical_levels_release_groups_and_bad_input(tmp_path: Path) -> None:
    from omopfl.policy import study_summary

    study = _write_study(tmp_path)
    assert study.categories["smoking"] == ("current", "former", "never", "other")
    assert study.feature_names()[-4:] == ["smoking_current", "smoking_former", "smoking_never", "smoking_other"]
    assert study.tables_read() == {
        "visit_occurrence": "[[features.concept_sets]] inpatient_visits",
        "condition_era": "[[features.concept_sets]] t2dm_eras", "drug_era": "[[features.concept_sets]] metformin_era",
        "observation": "[[features.measurements]] score_last", "measurement": "[[features.measurements]] inr"}
    summary = study_summary(study, SITE)
    assert summary["categories"]["smoking"] == ["smoking_current", "smoking_former", "smoking_never", "smoking_other"]
    assert "score_n" in summary["count_features"]
    bad = {
        "levels = { other = [1] }": "levels.other is generated",
        "levels = { current = [1], former = [1] }": "lists concept 1, already in level current",
        "levels = { Current = [1] }": "must be a lower-case level name",
        "levels = { current = [] }": "levels.current must be a non-empty list",
        "levels = {}": "levels must be a table",
    }
    for line, message in bad.items():
        text = STUDY_TOML.replace(
            f"levels = {{ current = [{CURRENT}], former = [{FORMER}], never = [{NEVER}] }}", line)
        with pytest.raises(ConfigError, match=message) as info:
            _write_study(tmp_path, text)
        assert "study.toml: [features.categoricals[0]]" in str(info.value) and "\n" not in str(info.value)
    clash = STUDY_TOML + '\n[[features.concept_sets]]\nname = "smoking_other"\ndomain = "observation"\nconcepts = [1]\n'
    with pytest.raises(ConfigError, match="smoking_other"):
        _write_study(tmp_path, clash)
    with pytest.raises(ConfigError, match=r"measurements\[0\]\] domain must be one of measurement, observation"):
        _write_study(tmp_path, STUDY_TOML.replace('domain = "observation"\nconcepts = [40771103]\nunit = "1"\n\n'
                                                  '[[features.measurements]]\nname = "score_mean"',
                                                  'domain = "drug"\nconcepts = [40771103]\nunit = "1"\n\n'
                                                  '[[features.measurements]]\nname = "score_mean"', 1))
    with pytest.raises(ConfigError, match=r"aggregate must be one of last, mean, min, max, count"):
        _write_study(tmp_path, STUDY_TOML.replace('aggregate = "mean"', 'aggregate = "median"'))


def test_prepare_on_a_synthetic_site_with_the_new_domains(backend, tmp_path: Path) -> None:
    """``omopfl synth`` smoking status, PHQ-9 score and unitless INR, through prepare, against pandas truth."""
    import os
    import uuid

    import pandas as pd

    from omopfl import vocab
    from omopfl.config import load_site
    from omopfl.db import make_engine
    from omopfl.prepare import load_prepared, prepare_site
    from omopfl.synth import run_synth

    text = (ROOT / "examples" / "t2dm_hf" / "study.toml").read_text().replace("../../cohorts/",
                                                                              f"{ROOT / 'cohorts'}/")
    text += f"""
[[features.categoricals]]
name = "smoking"
domain = "observation"
concepts = [{vocab.SMOKING_STATUS}]
levels = {{ current = [{vocab.SMOKING_CURRENT}], former = [{vocab.SMOKING_FORMER}] }}
window = [-3650, 0]

[[features.measurements]]
name = "phq9"
domain = "observation"
concepts = [{vocab.PHQ9_SCORE}]
unit = "1"
window = [-3650, 0]
aggregate = "max"

[[features.measurements]]
name = "inr"
concepts = [{vocab.INR}]
unit = "1"
window = [-3650, 0]
aggregate = "count"

[[features.concept_sets]]
name = "inpatient"
domain = "visit"
concepts = [9201]
window = [-3650, 0]
aggregate = "count"
"""
    study = _write_study(tmp_path, text)
    env = f"OMOPFL_TEST_{uuid.uuid4().hex[:8].upper()}_URL"
    os.environ[env] = backend.url
    kwargs = {"pg_url": backend.url, "pg_url_env": env} if backend.name == "postgresql" else {}
    try:
        run_synth(tmp_path / "synth", n_sites=1, persons=[600], seed=5, image_share=0, omics_share=0,
                  progress=False, **kwargs)
        site = load_site(tmp_path / "synth" / "adapters" / "site_a.toml")
        engine = make_engine(site.database_url())
        try:
            folder, manifest = prepare_site(engine, site, study, tmp_path / "prepared")
            with engine.connect() as conn:
                cohort = pd.read_sql(sa.text(
                    f"SELECT subject_id AS person_id, MIN(cohort_start_date) AS index_date FROM "
                    f"{site.results_schema}.cohort WHERE cohort_definition_id = 101 GROUP BY subject_id"), conn)
                obs = pd.read_sql(sa.text(
                    f"SELECT observation_id, person_id, observation_concept_id, observation_date, value_as_number,"
                    f" value_as_concept_id FROM {site.cdm_schema}.observation WHERE observation_concept_id IN"
                    f" ({vocab.SMOKING_STATUS}, {vocab.PHQ9_SCORE})"), conn)
                inr = pd.read_sql(sa.text(
                    f"SELECT person_id, measurement_date FROM {site.cdm_schema}.measurement"
                    f" WHERE measurement_concept_id = {vocab.INR}"), conn)
        finally:
            engine.dispose()
    finally:
        os.environ.pop(env, None)
    prepared = load_prepared(folder)
    persons = np.load(folder / "persons.npy")
    x = pd.DataFrame(prepared.x, columns=prepared.feature_names, index=persons)
    assert "smoking_other" in x.columns and "smoking__missing" not in x.columns and "inr__missing" not in x.columns
    assert "phq9__missing" in x.columns and manifest["harmonization"]["warnings"] == []
    # truth in pandas: rows from index - 3650 to index
    cohort["index_date"] = pd.to_datetime(cohort["index_date"])

    def in_window(rows: pd.DataFrame, date_column: str) -> pd.DataFrame:
        rows = rows.merge(cohort, on="person_id")
        days = (pd.to_datetime(rows[date_column]) - rows["index_date"]).dt.days
        return rows[(days >= -3650) & (days <= 0)]

    smoking = in_window(obs[obs["observation_concept_id"] == vocab.SMOKING_STATUS], "observation_date")
    last = smoking.sort_values(["person_id", "observation_date", "observation_id"]).groupby("person_id").tail(1)
    level = last.set_index("person_id")["value_as_concept_id"].map(
        {vocab.SMOKING_CURRENT: "current", vocab.SMOKING_FORMER: "former"}).fillna("other")
    expected = pd.DataFrame(0.0, index=x.index, columns=["smoking_current", "smoking_former", "smoking_other"])
    for person, label in level.items():
        expected.loc[person, f"smoking_{label}"] = 1.0
    pd.testing.assert_frame_equal(x[expected.columns], expected, check_dtype=False)
    assert expected["smoking_current"].sum() > 0 and expected["smoking_other"].sum() > 0  # never -> other
    phq = in_window(obs[obs["observation_concept_id"] == vocab.PHQ9_SCORE], "observation_date")
    maximum = phq.groupby("person_id")["value_as_number"].max().reindex(x.index)
    np.testing.assert_allclose(x["phq9"].to_numpy(), maximum.to_numpy())
    assert x["phq9__missing"].tolist() == maximum.isna().astype(float).tolist()
    counts = in_window(inr, "measurement_date").groupby("person_id").size().reindex(x.index, fill_value=0)
    assert x["inr"].tolist() == counts.astype(float).tolist() and counts.sum() > 0


def test_a_categorical_group_is_released_like_sex(tmp_path: Path) -> None:
    """The persons in none of a categorical's levels (no value) must not be a small cell, else the group goes."""
    from omopfl.policy import study_summary
    from omopfl.release import moments

    study = _write_study(tmp_path)
    groups = study_summary(study, SITE)["categories"]
    columns = groups["smoking"]
    k = 5

    def released(no_value: int) -> dict[str, bool]:
        rows = []
        for j in range(len(columns)):  # 6 persons per level (other included)
            rows += [[1.0 if i == j else 0.0 for i in range(len(columns))]] * 6
        rows += [[0.0] * len(columns)] * no_value
        x = np.array(rows)
        result = moments(x, columns, len(x), k, groups={"smoking": columns})
        return dict(zip(result.feature_names, result.released, strict=True))

    assert all(released(0).values()) and all(released(k).values())
    assert not any(released(3).values())  # 3 persons without a smoking value: small, the whole group withheld
