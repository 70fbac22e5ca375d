"""FeatureExtraction-style covariates on a tiny hand-made CDM, on DuckDB and PostgreSQL.

Every expected covariate below is worked out by hand from the rows inserted here (index dates, windows,
FeatureExtraction's ids ``concept_id * 1000 + analysis_id``); the domain analyses are also compared
with a plain hand-written query per analysis.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from omopfl.config import SiteConfig
from omopfl.covariate_sets import DEFAULT_SET, CovariateSettings, parse_covariates, write_covariate_list
from omopfl.covariates import covariate_counts, covariate_matrix, covariate_names, covariate_query
from omopfl.db import make_engine
from omopfl.errors import ConfigError, DatabaseError

TARGET = 1
SITE = SiteConfig(name="tiny", url_env=None, cdm_schema="cdm", vocabulary_schema="vocab", results_schema="results",
                  min_cell_count=1)

DDL = [
    "CREATE SCHEMA cdm", "CREATE SCHEMA vocab", "CREATE SCHEMA results",
    "CREATE TABLE cdm.person (person_id INTEGER, gender_concept_id INTEGER, year_of_birth INTEGER,"
    " month_of_birth INTEGER, day_of_birth INTEGER, race_concept_id INTEGER, ethnicity_concept_id INTEGER)",
    "CREATE TABLE cdm.condition_era (condition_era_id INTEGER, person_id INTEGER, condition_concept_id INTEGER,"
    " condition_era_start_date DATE, condition_era_end_date DATE)",
    "CREATE TABLE cdm.drug_era (drug_era_id INTEGER, person_id INTEGER, drug_concept_id INTEGER,"
    " drug_era_start_date DATE, drug_era_end_date DATE)",
    "CREATE TABLE cdm.procedure_occurrence (person_id INTEGER, procedure_concept_id INTEGER, procedure_date DATE)",
    "CREATE TABLE cdm.measurement (person_id INTEGER, measurement_concept_id INTEGER, measurement_date DATE)",
    "CREATE TABLE cdm.observation (person_id INTEGER, observation_concept_id INTEGER, observation_date DATE)",
    "CREATE TABLE cdm.visit_occurrence (person_id INTEGER, visit_concept_id INTEGER, visit_start_date DATE,"
    " visit_end_date DATE)",
    "CREATE TABLE vocab.concept (concept_id INTEGER, concept_name VARCHAR(255), domain_id VARCHAR(20),"
    " vocabulary_id VARCHAR(20), concept_class_id VARCHAR(20), standard_concept VARCHAR(1),"
    " concept_code VARCHAR(50))",
    "CREATE TABLE vocab.concept_ancestor (ancestor_concept_id INTEGER, descendant_concept_id INTEGER,"
    " min_levels_of_separation INTEGER, max_levels_of_separation INTEGER)",
    "CREATE TABLE results.cohort (cohort_definition_id BIGINT, subject_id BIGINT, cohort_start_date DATE,"
    " cohort_end_date DATE)",
]

ROWS: dict[str, list[tuple]] = {
    # persons 1-4 are in the target cohort; 5 only in another cohort
    "cdm.person": [(1, 8507, 1970, 3, 2, 8527, 0), (2, 8532, 1984, None, None, 0, 38003564),
                   (3, 0, 2001, 1, 1, 8516, 38003563), (4, 8507, 1960, 12, 31, 8527, 38003564),
                   (5, 8532, 1950, 1, 1, 8527, 0)],
    "results.cohort": [(1, 1, "2020-06-15", "2020-06-15"), (1, 2, "2020-06-15", "2020-07-15"),
                       (1, 3, "2020-06-15", "2020-06-15"), (1, 4, "2020-06-15", "2020-06-15"),
                       (1, 4, "2019-01-10", "2019-01-10"), (2, 5, "2020-06-15", "2020-06-15")],
    "vocab.concept": [
        (441840, "Clinical finding", "Condition", "SNOMED", "Clinical Finding", "S", "404684003"),
        (100, "Heart disease", "Condition", "SNOMED", "Clinical Finding", "S", "a100"),
        (101, "Acute myocardial infarction", "Condition", "SNOMED", "Clinical Finding", "S", "a101"),
        (200, "Disorder of heart", "Condition", "SNOMED", "Clinical Finding", "S", "a200"),
        (300, "Cough", "Condition", "SNOMED", "Clinical Finding", "S", "a300"),
        (433736, "Obesity", "Condition", "SNOMED", "Clinical Finding", "S", "414916001"),
        (1000, "HMG CoA reductase inhibitors", "Drug", "ATC", "ATC 4th", "C", "C10AA"),
        (1001, "atorvastatin; oral", "Drug", "ATC", "ATC 5th", "C", "C10AA05"),
        (1002, "atorvastatin", "Drug", "RxNorm", "Ingredient", "S", "83367"),
        (1003, "atorvastatin 10 MG Oral Tablet", "Drug", "RxNorm", "Clinical Drug", "S", "617312"),
        (4000, "Appendectomy", "Procedure", "SNOMED", "Procedure", "S", "80146002"),
        (9201, "Inpatient Visit", "Visit", "Visit", "Visit", "S", "IP"),
    ],
    "vocab.concept_ancestor": [
        (441840, 441840, 0, 0), (441840, 100, 3, 3), (441840, 101, 4, 4), (441840, 200, 3, 3), (441840, 300, 1, 1),
        (441840, 433736, 1, 1), (100, 100, 0, 0), (100, 101, 1, 1), (101, 101, 0, 0), (200, 200, 0, 0),
        (200, 101, 1, 1), (300, 300, 0, 0), (433736, 433736, 0, 0),
        (1000, 1000, 0, 0), (1000, 1001, 1, 1), (1000, 1002, 2, 2), (1001, 1002, 1, 1), (1002, 1002, 0, 0),
        (1000, 1003, 3, 3), (1001, 1003, 2, 2), (1002, 1003, 1, 1), (1003, 1003, 0, 0),
    ],
    "cdm.condition_era": [
        (1, 1, 101, "2020-01-01", "2020-02-01"),  # long window only
        (2, 1, 433736, "2020-06-01", "2020-06-20"),  # both windows (a listed group one level below 441840)
        (3, 2, 101, "2018-01-01", "2019-07-01"),  # starts before the long window, overlaps it
        (4, 2, 101, "2020-06-16", "2020-07-01"),  # after index: never
        (5, 3, 300, "2020-06-01", "2020-06-02"),  # Cough: one level below Clinical finding, not a group
        (6, 3, 0, "2020-06-01", "2020-06-02"),  # concept 0: never
        (7, 5, 101, "2020-06-01", "2020-06-02"),  # person not in the target cohort
    ],
    "cdm.drug_era": [
        (1, 1, 1002, "2020-06-10", "2020-07-10"),  # ingredient, ATC C10AA (C10AA05 has 7 characters: no group)
        (2, 4, 1002, "2019-06-01", "2019-07-01"),  # after person 4's first index (2019-01-10)
        (3, 2, 1002, "2019-01-01", "2019-06-15"),  # ends the day before person 2's long window
    ],
    "cdm.procedure_occurrence": [(1, 4000, "2020-06-15"), (2, 4000, "2019-06-15"), (2, 4001, "2019-06-16"),
                                 (3, 0, "2020-06-01"), (1, 4000, "2020-06-16")],
    "cdm.measurement": [(3, 5000, "2020-06-01"), (3, 5000, "2020-06-02"), (4, 5000, "2020-06-01")],
    "cdm.observation": [(4, 6000, "2018-12-20"), (4, 6001, "2018-01-01")],
    "cdm.visit_occurrence": [(1, 9201, "2020-06-01", "2020-06-01"), (1, 9201, "2020-03-01", "2020-03-02"),
                             (1, 9203, "2019-01-01", "2019-01-01"), (2, 9202, "2019-06-01", "2019-06-20")],
}

EXPECTED: dict[int, dict[int, float]] = {
    1: {8507001: 1, 10003: 1, 8527004: 1, 2020006: 1, 6007: 1,
        101210: 1, 100210: 1, 433736210: 1, 433736212: 1,
        1002410: 1, 1002412: 1, 1000410: 1, 1000412: 1,
        4000502: 1, 4000504: 1,
        1920: 2, 1922: 1, 9201923: 2, 9201925: 1},
    2: {8532001: 1, 7003: 1, 38003564005: 1, 2020006: 1, 6007: 1,
        101210: 1, 100210: 1, 4001502: 1, 1920: 1, 9202923: 1},
    3: {3003: 1, 8516004: 1, 38003563005: 1, 2020006: 1, 6007: 1, 5000702: 1, 5000704: 1},
    4: {8507001: 1, 11003: 1, 8527004: 1, 38003564005: 1, 2019006: 1, 1007: 1, 6000802: 1, 6000804: 1},
}
ALL = (1, 3, 4, 5, 6, 7, 210, 212, 410, 412, 502, 504, 702, 704, 802, 804, 920, 922, 923, 925)


def _load(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        for statement in DDL:
            conn.execute(sa.text(statement))
        for table, rows in ROWS.items():
            width = len(rows[0])
            casts = [f"CAST(:v{i} AS DATE)" if isinstance(rows[0][i], str) and rows[0][i][:2] in ("20", "19")
                     else f":v{i}" for i in range(width)]
            sql = f"INSERT INTO {table} VALUES ({', '.join(casts)})"
            conn.execute(sa.text(sql), [{f"v{i}": v for i, v in enumerate(row)} for row in rows])


@pytest.fixture(scope="module", params=["duckdb", "postgresql"])
def tiny(request, database_factory) -> Iterator[sa.Engine]:
    engine = make_engine(database_factory(request.param, "covtiny"))
    _load(engine)
    yield engine
    engine.dispose()


def _long(conn: sa.Connection, settings: CovariateSettings) -> dict[int, dict[int, float]]:
    out: dict[int, dict[int, float]] = {}
    for pid, cid, value in conn.execute(sa.text(covariate_query(SITE, TARGET, settings))):
        assert cid not in out.setdefault(int(pid), {}), "one row per person and covariate"
        out[int(pid)][int(cid)] = float(value)
    return out


@pytest.mark.parametrize("analysis", ALL)
def test_each_analysis_matches_hand_computed_covariates(tiny: sa.Engine, analysis: int) -> None:
    with tiny.connect() as conn:
        got = _long(conn, CovariateSettings(analyses=(analysis,)))
    want = {p: {c: v for c, v in cov.items() if c % 1000 == analysis} for p, cov in EXPECTED.items()}
    want = {p: cov for p, cov in want.items() if cov}
    assert got == want


HAND_SQL = """
SELECT DISTINCT t.person_id, e.{concept} * 1000 + {aid}
FROM (SELECT subject_id AS person_id, MIN(cohort_start_date) AS d FROM results.cohort
      WHERE cohort_definition_id = 1 GROUP BY subject_id) t
JOIN cdm.{table} e ON e.person_id = t.person_id
WHERE e.{date} >= t.d - {days} AND e.{date} <= t.d AND e.{concept} <> 0
"""


@pytest.mark.parametrize("aid,table,concept,date,days", [
    (502, "procedure_occurrence", "procedure_concept_id", "procedure_date", 365),
    (504, "procedure_occurrence", "procedure_concept_id", "procedure_date", 30),
    (702, "measurement", "measurement_concept_id", "measurement_date", 365),
    (704, "measurement", "measurement_concept_id", "measurement_date", 30),
    (802, "observation", "observation_concept_id", "observation_date", 365),
    (804, "observation", "observation_concept_id", "observation_date", 30),
])
def test_domain_analyses_equal_a_hand_written_query(tiny: sa.Engine, aid: int, table: str, concept: str,
                                                    date: str, days: int) -> None:
    with tiny.connect() as conn:
        hand = {(int(p), int(c)) for p, c in conn.execute(sa.text(HAND_SQL.format(
            aid=aid, table=table, concept=concept, date=date, days=days)))}
        ours = {(p, c) for p, cov in _long(conn, CovariateSettings(analyses=(aid,))).items() for c in cov}
    assert ours == hand and hand


def test_windows_follow_the_settings(tiny: sa.Engine) -> None:
    # a 400-day long window reaches person 2's procedure 4000 (366 days before index)
    with tiny.connect() as conn:
        got = _long(conn, CovariateSettings(analyses=(502,), long_term_days=400))
    assert got[2] == {4000502: 1, 4001502: 1}


def test_counts_and_matrix(tiny: sa.Engine) -> None:
    settings = CovariateSettings(analyses=ALL)
    with tiny.connect() as conn:
        counts = covariate_counts(conn, SITE, TARGET, settings)
        persons = [4, 2, 9, 1]  # any order; 9 has no covariate; 3 is left out
        fixed = CovariateSettings(analyses=ALL, covariate_ids=(101210, 1920, 8507001, 999999210))
        cm = covariate_matrix(conn, SITE, TARGET, fixed, persons, chunk_rows=3)
        names = covariate_names(conn, SITE, [101210, 10003, 1920, 777210])
    want_counts: dict[int, int] = {}
    for cov in EXPECTED.values():
        for c in cov:
            want_counts[c] = want_counts.get(c, 0) + 1
    assert counts == want_counts
    assert list(cm.covariate_ids) == [1920, 101210, 8507001, 999999210]
    dense = cm.matrix.toarray()
    assert dense.tolist() == [[0, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [2, 1, 1, 0]]
    assert names[101210] == "ConditionGroupEraLongTerm: Acute myocardial infarction"
    assert names[10003] == "DemographicsAgeGroup: 50-54"
    assert names[777210].endswith("Unknown concept")


def test_matrix_of_all_covariates_found(tiny: sa.Engine) -> None:
    with tiny.connect() as conn:
        cm = covariate_matrix(conn, SITE, TARGET, CovariateSettings(analyses=ALL), [1, 2, 3, 4])
    want = sorted({c for cov in EXPECTED.values() for c in cov})
    assert list(cm.covariate_ids) == want
    for row, pid in enumerate([1, 2, 3, 4]):
        got = {int(cm.covariate_ids[j]): float(v) for j, v in zip(cm.matrix[row].indices, cm.matrix[row].data,
                                                                    strict=True)}
        assert got == EXPECTED[pid]


def test_default_set_is_fe_default_restricted() -> None:
    assert DEFAULT_SET == (1, 3, 4, 5, 6, 7, 210, 212, 410, 412, 502, 504, 702, 704, 802, 804)


def test_parse_covariates(tmp_path: Path) -> None:
    study = tmp_path / "study.toml"
    settings = parse_covariates({"analyses": ["DemographicsGender", 210]}, tmp_path, study)
    assert settings.analyses == (1, 210) and settings.covariate_ids is None
    write_covariate_list(tmp_path / "cov.csv", [{"covariate_id": 8507001, "covariate_name": "m", "sites": 2},
                                                {"covariate_id": 101210, "sites": 3}])
    settings = parse_covariates({"analyses": [1, 210], "list": "cov.csv"}, tmp_path, study)
    assert settings.covariate_ids == (101210, 8507001) and len(settings.list_sha256) == 64
    with pytest.raises(ConfigError, match=r"\[covariates\] list.*analysis 1"):
        parse_covariates({"analyses": [210], "list": "cov.csv"}, tmp_path, study)
    with pytest.raises(ConfigError, match=r"\[covariates\] list.*not found; run omopfl covariates"):
        parse_covariates({"list": "absent.csv"}, tmp_path, study)
    with pytest.raises(ConfigError, match=r"\[covariates\] analyses: unknown analysis 999"):
        parse_covariates({"analyses": [999]}, tmp_path, study)
    with pytest.raises(ConfigError, match=r"\[covariates\] long_term_days"):
        parse_covariates({"long_term_days": -3}, tmp_path, study)
    assert np.array_equal(DEFAULT_SET, parse_covariates({}, tmp_path, study).analyses)


def test_a_missing_table_names_the_analysis(tiny: sa.Engine) -> None:
    import dataclasses

    site = dataclasses.replace(SITE, cdm_schema="vocab")  # no condition_era there
    with tiny.connect() as conn, pytest.raises(DatabaseError, match=r"analysis 210 \(ConditionGroupEraLongTerm\) "
                                                                      r"reads vocab.condition_era"):
        covariate_counts(conn, site, TARGET, CovariateSettings(analyses=(210, 212)))
