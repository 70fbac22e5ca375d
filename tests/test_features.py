"""Features computed in the database, then harmonized, on DuckDB and PostgreSQL.

Three synthetic sites record glucose differently (site_a mg/dL, site_b mmol/L, site_c both);
after features and harmonization the last pre-index glucose must equal the generator's truth.
Planted rows (unknown units, NaN, impossible values, a site without women) are inserted inside
a transaction that is rolled back, so the shared sites stay as generated.
"""

from __future__ import annotations

import dataclasses
import io
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from omopfl import vocab
from omopfl.cohort import build_cohorts, load_definition
from omopfl.config import SiteConfig, load_site
from omopfl.db import make_engine, qualified
from omopfl.errors import ConfigError, DatabaseError
from omopfl.features import (
    feature_columns,
    feature_query,
    read_features,
    stream_features,
    unknown_unit_counts,
)
from omopfl.harmonize import harmonize, harmonized_columns
from omopfl.study import StudyConfig, load_study

ROOT = Path(__file__).resolve().parents[1]
STUDY = load_study(ROOT / "examples" / "t2dm_hf" / "study.toml")
TARGET, OUTCOME = 101, 102
GLUCOSE = 3004501


@dataclass
class Sites:
    backend: str
    configs: list[SiteConfig]
    engine: sa.Engine  # DuckDB: one file per site, so one engine per site in `engines`
    engines: list[sa.Engine]
    truths: list[dict]


@pytest.fixture(scope="module")
def sites(backend_name, database_factory, tmp_path_factory) -> Iterator[Sites]:
    """Three synthetic sites with the study's target (101) and outcome (102) cohorts built."""
    from omopfl.synth import run_synth

    url = database_factory(backend_name, "features")
    out = tmp_path_factory.mktemp("featuresynth")
    env = f"OMOPFL_TEST_{uuid.uuid4().hex[:8].upper()}_URL"
    os.environ[env] = url
    options = {"n_sites": 3, "persons": [1000, 800, 800], "seed": 5, "image_share": 0, "omics_share": 0,
               "progress": False}
    if backend_name == "postgresql":
        options.update(pg_url=url, pg_url_env=env)
    summaries = run_synth(out, **options)
    configs = [load_site(out / "adapters" / f"{s.site}.toml") for s in summaries]
    engines = [make_engine(config.database_url()) for config in configs]
    definitions = [(load_definition(STUDY.target_cohort), TARGET), (load_definition(STUDY.outcome_cohort), OUTCOME)]
    for config, engine in zip(configs, engines, strict=True):
        build_cohorts(engine, config, definitions, replace=True)
    yield Sites(backend_name, configs, engines[0], engines, [s.truth_dict() for s in summaries])
    for engine in engines:
        engine.dispose()
    os.environ.pop(env, None)


def _features(engine: sa.Engine, config: SiteConfig, study: StudyConfig = STUDY):
    with engine.connect() as conn:
        return read_features(conn, config, study, TARGET, OUTCOME)


@contextmanager
def _rolled_back(engine: sa.Engine) -> Iterator[sa.Connection]:
    """A connection inside a transaction that is always rolled back."""
    with engine.connect() as conn:
        transaction = conn.begin()
        try:
            yield conn
        finally:
            transaction.rollback()


# ----------------------------------------------------------------------------- truth of the generator
def test_glucose_equals_generator_truth_in_every_unit(sites: Sites) -> None:
    assert [t["units"]["glucose"] for t in sites.truths] == [["mg/dL"], ["mmol/L"], ["mg/dL", "mmol/L"]]
    means = []
    for config, engine, truth in zip(sites.configs, sites.engines, sites.truths, strict=True):
        features = _features(engine, config)
        frame, report = harmonize(features.frame, STUDY, unknown_units=features.unknown_units)
        expected = truth["glucose_last_pre_index"]
        glucose = frame["glucose"].dropna().to_numpy()
        assert len(glucose) == expected["n"] > 20
        assert glucose.mean() == pytest.approx(expected["mean_mg_dl"], rel=1e-9)
        assert glucose.std(ddof=1) == pytest.approx(expected["std_mg_dl"], rel=1e-9)
        assert frame["glucose__missing"].sum() == len(frame) - expected["n"]
        assert features.unknown_units["glucose"] == {}
        assert report.to_dict()["features"]["glucose"]["implausible"] == 0
        means.append(glucose.mean())
    # In the canonical unit the sites agree; the raw values do not (site_b stores mmol/L).
    assert max(means) / min(means) < 1.25
    raw_means = []
    for config, engine in zip(sites.configs, sites.engines, strict=True):
        with engine.connect() as conn:
            raw_means.append(conn.execute(sa.text(
                f"SELECT AVG(value_as_number) FROM {qualified(config.cdm_schema, 'measurement')}"
                " WHERE measurement_concept_id = :c"), {"c": GLUCOSE}).scalar_one())
    assert raw_means[1] < 20 < 100 < raw_means[0]


def test_one_row_per_target_person_and_labels(sites: Sites) -> None:
    for config, engine, truth in zip(sites.configs, sites.engines, sites.truths, strict=True):
        frame = _features(engine, config).frame
        assert list(frame.columns) == [c.name for c in feature_columns(STUDY)]
        assert len(frame) == truth["target_persons"]
        assert frame["person_id"].is_unique and frame["person_id"].is_monotonic_increasing
        assert int(frame["label"].sum()) == truth["outcome_persons"]
        assert frame["age"].between(18, 110).all()
        assert (frame["prior_observation_days"] >= 365).all()  # the cohort asks for 365 days
        assert set(frame["sex"]) == {"male", "female"}
        assert frame["label"].dtype == np.int64 and frame["glucose"].dtype == np.float64


def test_hypertension_and_statins_equal_independent_sql(sites: Sites) -> None:
    config, engine = sites.configs[0], sites.engines[0]
    frame = _features(engine, config).frame
    hypertension = sorted(vocab.descendants(316866))  # from the Python vocabulary, not concept_ancestor
    statins = sorted(vocab.descendants(1545958))
    cohort = qualified(config.results_schema, "cohort")
    conditions = qualified(config.cdm_schema, "condition_occurrence")
    drugs = qualified(config.cdm_schema, "drug_exposure")
    index = (f"SELECT subject_id, MIN(cohort_start_date) AS d FROM {cohort}"
             " WHERE cohort_definition_id = :t GROUP BY subject_id")
    with engine.connect() as conn:
        persons = conn.execute(sa.text(
            f"SELECT COUNT(DISTINCT i.subject_id) FROM ({index}) i JOIN {conditions} c ON c.person_id = i.subject_id"
            " WHERE c.condition_concept_id IN :ids"
            " AND c.condition_start_date >= i.d - 3650 AND c.condition_start_date <= i.d"
        ).bindparams(sa.bindparam("ids", expanding=True)), {"t": TARGET, "ids": hypertension}).scalar_one()
        prescriptions = conn.execute(sa.text(
            f"SELECT COUNT(*) FROM ({index}) i JOIN {drugs} d ON d.person_id = i.subject_id"
            " WHERE d.drug_concept_id IN :ids"
            " AND d.drug_exposure_start_date >= i.d - 365 AND d.drug_exposure_start_date <= i.d"
        ).bindparams(sa.bindparam("ids", expanding=True)), {"t": TARGET, "ids": statins}).scalar_one()
    assert int(frame["hypertension"].sum()) == persons > 0
    assert set(frame["hypertension"]) == {0, 1}
    assert int(frame["statin_prescriptions"].sum()) == prescriptions


# ----------------------------------------------------------------------------- streaming and SQL forms
def test_streaming_in_small_chunks_gives_the_same_frame(sites: Sites) -> None:
    config, engine = sites.configs[0], sites.engines[0]
    whole = _features(engine, config).frame
    with engine.connect() as conn:
        stream = stream_features(conn, config, STUDY, TARGET, OUTCOME, chunk_rows=17)
        chunks = [next(stream)]
        if sites.backend == "postgresql":  # a named (server-side) cursor is open while chunks are read
            assert conn.execute(sa.text("SELECT COUNT(*) FROM pg_cursors")).scalar_one() == 1
        chunks += list(stream)
        assert conn.get_execution_options().get("stream_results") is None  # the connection is left as it was
    assert len(chunks) == -(-len(whole) // 17) >= 3
    assert all(len(c) <= 17 for c in chunks)
    pd.testing.assert_frame_equal(pd.concat(chunks, ignore_index=True), whole)
    with engine.connect() as conn:
        empty = list(stream_features(conn, config, STUDY, 999, OUTCOME))
    assert len(empty) == 1 and empty[0].empty and list(empty[0].columns) == list(whole.columns)


def test_literal_sql_and_copy_give_the_same_rows(sites: Sites) -> None:
    config, engine = sites.configs[2], sites.engines[2]
    clause, params = feature_query(config, STUDY, TARGET, OUTCOME)
    sql, none = feature_query(config, STUDY, TARGET, OUTCOME, literal=True)
    assert params and none == {} and isinstance(sql, str)
    with engine.connect() as conn:
        bound = conn.execute(clause, params).all()
        literal = conn.execute(sa.text(sql)).all()  # text() escapes the '%' unit code for psycopg2
        assert bound == literal
        if sites.backend == "postgresql":
            buffer = io.StringIO()
            with conn.connection.driver_connection.cursor() as cursor:
                cursor.copy_expert(f"COPY ({sql}) TO STDOUT WITH (FORMAT csv, HEADER true)", buffer)
            copied = pd.read_csv(io.StringIO(buffer.getvalue()))
            assert list(copied.columns) == [c.name for c in feature_columns(STUDY)]
            assert len(copied) == len(bound)


# ----------------------------------------------------------------------------- planted rows
def _insert_glucose(conn: sa.Connection, config: SiteConfig, person_id: int, day, value: float, unit: int) -> None:
    table = qualified(config.cdm_schema, "measurement")
    next_id = conn.execute(sa.text(f"SELECT MAX(measurement_id) + 1 FROM {table}")).scalar_one()
    conn.execute(sa.text(
        f"INSERT INTO {table} (measurement_id, person_id, measurement_concept_id, measurement_date,"
        " measurement_type_concept_id, value_as_number, unit_concept_id)"
        " VALUES (:id, :p, :c, :d, 32856, CAST(:v AS DOUBLE PRECISION), :u)"),
        {"id": next_id, "p": person_id, "c": GLUCOSE, "d": day, "v": value, "u": unit})


def test_unknown_units_nan_and_impossible_values_are_counted_not_mixed(sites: Sites) -> None:
    config, engine = sites.configs[0], sites.engines[0]  # site_a: glucose in mg/dL
    before = _features(engine, config).frame.set_index("person_id")
    with_value = before[before["glucose"].notna()]
    p_unit, p_nan, p_impossible, p_inf = with_value.index[:4]
    day = {p: (with_value.loc[p, "index_date"] - timedelta(days=1)).date() for p in with_value.index[:4]}
    with _rolled_back(engine) as conn:
        # latest rows of the window; "%" (8554) has no glucose conversion, 424242 is no concept at all
        _insert_glucose(conn, config, p_unit, day[p_unit], 7.0, 8554)
        _insert_glucose(conn, config, p_unit, day[p_unit], 7.0, 8554)
        _insert_glucose(conn, config, p_unit, day[p_unit], 9.0, 424242)
        _insert_glucose(conn, config, p_nan, day[p_nan], float("nan"), 8840)
        _insert_glucose(conn, config, p_inf, day[p_inf], float("inf"), 8840)
        _insert_glucose(conn, config, p_impossible, day[p_impossible], 5000.0, 8840)
        features = read_features(conn, config, STUDY, TARGET, OUTCOME)
        counts = unknown_unit_counts(conn, config, STUDY, TARGET)
    after = features.frame.set_index("person_id")
    assert counts["glucose"] == {"%": 2, "concept_id 424242": 1}
    assert features.unknown_units == counts
    assert after.loc[p_unit, "glucose__unknown_unit"] == 3
    assert after["glucose__unknown_unit"].sum() == 3
    assert after.loc[p_unit, "glucose"] == before.loc[p_unit, "glucose"]  # not mixed into the value
    assert after.loc[p_nan, "glucose__non_finite"] == 1 and after.loc[p_inf, "glucose__non_finite"] == 1
    assert after.loc[p_nan, "glucose"] == before.loc[p_nan, "glucose"]
    assert after.loc[p_impossible, "glucose"] == 5000.0
    frame, report = harmonize(features.frame, STUDY, unknown_units=features.unknown_units)
    frame = frame.set_index("person_id")
    assert np.isnan(frame.loc[p_impossible, "glucose"]) and frame.loc[p_impossible, "glucose__missing"] == 1
    glucose = report.to_dict()["features"]["glucose"]
    assert glucose == {"unknown_unit": {"%": 2, "concept_id 424242": 1}, "unknown_unit_rows": 3,
                       "implausible": 1, "non_finite": 2, "unmapped": {}}
    assert _features(engine, config).frame.equals(before.reset_index())  # rolled back


def test_sex_levels_are_fixed_by_the_study(sites: Sites) -> None:
    config, engine = sites.configs[1], sites.engines[1]
    person = qualified(config.cdm_schema, "person")
    with _rolled_back(engine) as conn:
        conn.execute(sa.text(f"UPDATE {person} SET gender_concept_id = 8507"))  # a site without women
        first = conn.execute(sa.text(
            f"SELECT MIN(subject_id) FROM {qualified(config.results_schema, 'cohort')}"
            " WHERE cohort_definition_id = :t"), {"t": TARGET}).scalar_one()
        conn.execute(sa.text(f"UPDATE {person} SET gender_concept_id = 0 WHERE person_id = :p"), {"p": first})
        features = read_features(conn, config, STUDY, TARGET, OUTCOME)
    frame, report = harmonize(features.frame, STUDY)
    assert list(frame.columns) == [c.name for c in harmonized_columns(STUDY)]
    assert frame["sex_female"].dtype == np.int64 and frame["sex_female"].sum() == 0
    assert frame["sex_male"].sum() == len(frame) - 1
    assert report.unmapped["sex"] == {"other": 1}


# ----------------------------------------------------------------------------- bad input
def test_parameters_are_bound_and_checked(sites: Sites) -> None:
    config = sites.configs[0]
    odd = dataclasses.replace(STUDY.measurements[1], unit="mg/dL'; DROP TABLE x; --")
    study = dataclasses.replace(STUDY, measurements=(odd,))
    clause, params = feature_query(config, study, TARGET, OUTCOME)
    assert "DROP" not in str(clause) and odd.unit in params.values()
    with pytest.raises(ConfigError):
        feature_query(config, study, TARGET, OUTCOME, literal=True)
    with pytest.raises(ConfigError):
        feature_query(config, STUDY, "101", OUTCOME)
    with pytest.raises(ConfigError):
        feature_query(dataclasses.replace(config, cdm_schema='cdm"; --'), STUDY, TARGET, OUTCOME)
    with sites.engine.connect() as conn, pytest.raises(ConfigError):
        stream_features(conn, config, STUDY, TARGET, OUTCOME, chunk_rows=0)
    # the study's unit is unknown to the table: only rows in exactly that unit are used, others counted
    with sites.engine.connect() as conn:
        frame = read_features(conn, config, study, TARGET, OUTCOME).frame
    assert frame["glucose"].isna().all() and frame["glucose__unknown_unit"].sum() > 0


def test_missing_results_schema_is_a_database_error(sites: Sites) -> None:
    config = dataclasses.replace(sites.configs[0], results_schema="no_such_schema")
    with sites.engine.connect() as conn, pytest.raises(DatabaseError, match="feature query failed"):
        next(stream_features(conn, config, STUDY, TARGET, OUTCOME))


# ----------------------------------------------------------------------------- real data
def test_eunomia_features_despite_its_defects(tmp_path: Path) -> None:
    """Eunomia GiBleed (duplicate ids, no lab values) on DuckDB with the example study, plus a measurement."""
    from omopfl.eunomia import load_eunomia, write_adapter

    url = f"duckdb:///{tmp_path / 'omop.duckdb'}"
    engine = make_engine(url)
    env = f"OMOPFL_TEST_{uuid.uuid4().hex[:8].upper()}_URL"
    os.environ[env] = url
    try:
        with engine.begin() as conn:
            load_eunomia(conn, cdm_schema="cdm")
        config = load_site(write_adapter(tmp_path / "eunomia.toml", "eunomia", url_env=env))
        study = load_study(ROOT / "examples" / "eunomia_gibleed" / "study.toml")
        with engine.connect() as conn:
            common = conn.execute(sa.text(
                "SELECT measurement_concept_id FROM cdm.measurement GROUP BY 1 ORDER BY COUNT(*) DESC, 1 LIMIT 1"
            )).scalar_one()
        lab = dataclasses.replace(STUDY.measurements[1], name="common_lab", concepts=(int(common),),
                                  window=(-3650, 0), plausible_range=None)
        study = dataclasses.replace(study, measurements=(lab,))
        build_cohorts(engine, config, [(load_definition(study.target_cohort), 1),
                                       (load_definition(study.outcome_cohort), 2)], replace=True)
        with engine.connect() as conn:
            features = read_features(conn, config, study, 1, 2, chunk_rows=500)
            persons = conn.execute(sa.text(
                "SELECT COUNT(DISTINCT subject_id) FROM results.cohort WHERE cohort_definition_id = 1")).scalar_one()
        frame, report = harmonize(features.frame, study, unknown_units=features.unknown_units)
    finally:
        engine.dispose()
        os.environ.pop(env, None)
    assert len(frame) == persons == 1800 and frame["person_id"].is_unique
    assert 0 < frame["label"].sum() < len(frame)
    assert frame["sex_male"].sum() + frame["sex_female"].sum() == len(frame)
    assert frame["peptic_ulcer"].isin([0, 1]).all() and (frame["respiratory_infections"] >= 0).all()
    assert frame["common_lab"].isna().all() and frame["common_lab__missing"].all()  # Eunomia has no lab values
    assert report.rows == 1800
