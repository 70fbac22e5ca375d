"""The synthetic generator, checked against the databases it writes (DuckDB and PostgreSQL).

The truth each site reports is recomputed here with independent SQL, from the rows
actually written; files are read back with pydicom and the csv module.
"""

from __future__ import annotations

import csv
import hashlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import sqlalchemy as sa

from omopfl import vocab
from omopfl.config import load_site
from omopfl.db import make_engine, qualified
from omopfl.errors import ConfigError, DatabaseError
from omopfl.synth import (
    DEFAULT_URL_ENV,
    OMICS_GENES,
    SiteSummary,
    bayes_auc,
    run_synth,
    split_persons,
)

SIZES = [600, 400, 300]
SEED = 11


def _new_pg_database(admin_url: str, tag: str) -> str:
    name = f"t_{tag}_{uuid.uuid4().hex[:10]}"
    admin = make_engine(admin_url).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return sa.engine.make_url(admin_url).set(database=name).render_as_string(hide_password=False)


@dataclass
class World:
    """Three synthetic sites on one backend, generated once for the module."""

    backend: str
    out: Path
    url: str | None  # the PostgreSQL URL; None for DuckDB files
    summaries: list[SiteSummary]

    def site_url(self, summary: SiteSummary) -> str:
        if self.url is not None:
            return self.url
        return load_site(summary.adapter).database_url()

    def query(self, summary: SiteSummary, sql: str, **params) -> list[tuple]:
        engine = make_engine(self.site_url(summary))
        try:
            with engine.connect() as conn:
                return [tuple(r) for r in conn.execute(sa.text(sql.format(cdm=f'"{summary.cdm_schema}"')), params)]
        finally:
            engine.dispose()


@pytest.fixture(scope="module", params=["duckdb", "postgresql"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    out = tmp_path_factory.mktemp(f"synth_{request.param}")
    url = None
    if request.param == "postgresql":
        url = _new_pg_database(request.getfixturevalue("pg_admin_url"), "synth")
    summaries = run_synth(out, n_sites=3, persons=SIZES, seed=SEED, pg_url=url, image_share=1.0, omics_share=1.0,
                          progress=False)
    yield World(request.param, out, url, summaries)


TARGET_SQL = """
WITH t2dm AS (
    SELECT descendant_concept_id AS concept_id FROM {cdm}.concept_ancestor WHERE ancestor_concept_id = 201826
), first_dx AS (
    SELECT co.person_id, MIN(co.condition_start_date) AS index_date
    FROM {cdm}.condition_occurrence co JOIN t2dm ON co.condition_concept_id = t2dm.concept_id
    GROUP BY co.person_id
), target AS (
    SELECT f.person_id, f.index_date
    FROM first_dx f JOIN {cdm}.observation_period op ON op.person_id = f.person_id
     AND f.index_date BETWEEN op.observation_period_start_date AND op.observation_period_end_date
    WHERE op.observation_period_start_date + 365 <= f.index_date
), hf AS (
    SELECT descendant_concept_id AS concept_id FROM {cdm}.concept_ancestor WHERE ancestor_concept_id = 316139
), outcome AS (
    SELECT DISTINCT t.person_id
    FROM target t JOIN {cdm}.condition_occurrence co ON co.person_id = t.person_id
    JOIN hf ON co.condition_concept_id = hf.concept_id
    WHERE co.condition_start_date BETWEEN t.index_date + 1 AND t.index_date + 365
)
"""


def test_cohort_counts_match_independent_sql(world: World) -> None:
    for s in world.summaries:
        (t2dm,), = world.query(s, """
            SELECT COUNT(DISTINCT co.person_id) FROM {cdm}.condition_occurrence co
            JOIN {cdm}.concept_ancestor ca ON ca.descendant_concept_id = co.condition_concept_id
            WHERE ca.ancestor_concept_id = 201826""")
        (target, outcome), = world.query(
            s, TARGET_SQL + "SELECT (SELECT COUNT(*) FROM target), (SELECT COUNT(*) FROM outcome)")
        assert (t2dm, target, outcome) == (s.t2dm_persons, s.target_persons, s.outcome_persons), s.site
        assert 0 < s.target_persons < s.t2dm_persons < s.persons
        assert s.outcome_rate == pytest.approx(outcome / target)
        assert int(s.scores[1].sum()) == outcome


def test_persons_rows_and_sex_match(world: World) -> None:
    for s, size in zip(world.summaries, SIZES, strict=True):
        by_sex = dict(world.query(s, "SELECT gender_concept_id, COUNT(*) FROM {cdm}.person GROUP BY 1"))
        assert s.persons == size == sum(by_sex.values())
        assert by_sex == {8507: s.persons_by_sex["male"], 8532: s.persons_by_sex["female"]}
        for table, count in s.rows.items():
            (n,), = world.query(s, f"SELECT COUNT(*) FROM {qualified(s.cdm_schema, table)}")
            assert n == count, (s.site, table)
        (version,), = world.query(s, "SELECT cdm_version FROM {cdm}.cdm_source")
        assert version == "v5.4"


def test_glucose_truth_matches_sql_in_canonical_units(world: World) -> None:
    for s in world.summaries:
        (n, mean, std), = world.query(s, TARGET_SQL + """
            , g AS (
                SELECT t.person_id,
                       CASE WHEN m.unit_concept_id = 8753 THEN m.value_as_number * 18.016
                            ELSE m.value_as_number END AS mg,
                       ROW_NUMBER() OVER (PARTITION BY t.person_id ORDER BY m.measurement_date DESC) AS rn
                FROM target t JOIN {cdm}.measurement m ON m.person_id = t.person_id
                WHERE m.measurement_concept_id = 3004501 AND m.value_as_number IS NOT NULL
                  AND m.measurement_date BETWEEN t.index_date - 365 AND t.index_date - 1)
            SELECT COUNT(*), AVG(mg), STDDEV_SAMP(mg) FROM g WHERE rn = 1""")
        truth = s.glucose_last_pre_index
        assert n == truth["n"] > 0
        assert float(mean) == pytest.approx(truth["mean_mg_dl"], rel=1e-9)
        assert float(std) == pytest.approx(truth["std_mg_dl"], rel=1e-9)
    means = [s.glucose_last_pre_index["mean_mg_dl"] for s in world.summaries]
    assert max(means) - min(means) < 30  # same population scale once harmonized to mg/dL


def test_units_differ_between_sites_as_planned(world: World) -> None:
    found = {}
    for s in world.summaries:
        rows = world.query(s, """
            SELECT measurement_concept_id, unit_concept_id FROM {cdm}.measurement
            WHERE measurement_concept_id IN (3004501, 3004410, 3016723) GROUP BY 1, 2""")
        units = {lab: sorted(u for c, u in rows if c == vocab.LABS[lab].concept_id)
                 for lab in ("glucose", "hba1c", "creatinine")}
        assert units == {lab: s.unit_concept_ids[lab] for lab in units}
        found[s.site] = units
    assert found["site_a"] == {"glucose": [8840], "hba1c": [8554], "creatinine": [8840]}
    assert found["site_b"] == {"glucose": [8753], "hba1c": [9579], "creatinine": [8749]}
    assert found["site_c"]["glucose"] == [8753, 8840]  # one site mixes mg/dL and mmol/L
    assert world.summaries[1].units["glucose"] == ["mmol/L"]


def test_missing_values_and_dirty_rows_are_present_and_counted(world: World) -> None:
    for s in world.summaries:
        for table, date, concept in (
            ("condition_occurrence", "condition_start_date", "condition_concept_id"),
            ("drug_exposure", "drug_exposure_start_date", "drug_concept_id"),
            ("measurement", "measurement_date", "measurement_concept_id"),
        ):
            (outside,), = world.query(s, f"""
                SELECT COUNT(*) FROM {qualified(s.cdm_schema, table)} x
                JOIN {{cdm}}.observation_period op ON op.person_id = x.person_id
                WHERE x.{date} < op.observation_period_start_date OR x.{date} > op.observation_period_end_date""")
            (unmapped,), = world.query(s, f"SELECT COUNT(*) FROM {qualified(s.cdm_schema, table)} WHERE {concept} = 0")
            assert outside == s.dirty_rows["outside_observation_period"].get(table, 0), (s.site, table)
            assert unmapped == s.dirty_rows["unmapped_concept"].get(table, 0), (s.site, table)
        nulls = dict(world.query(s, """
            SELECT measurement_concept_id, COUNT(*) FROM {cdm}.measurement
            WHERE value_as_number IS NULL GROUP BY 1"""))
        assert nulls == {vocab.LABS[k].concept_id: v for k, v in s.null_values.items() if v}
    totals = [sum(sum(t.values()) for t in s.dirty_rows.values()) for s in world.summaries]
    assert sum(totals) > 0 and sum(sum(s.null_values.values()) for s in world.summaries) > 0


def _image_brightness(path: Path) -> float:
    pixels = pydicom.dcmread(path).pixel_array.astype(float)
    return float(np.sort(pixels.ravel())[-64:].mean())


def _normalized_blob_area(path: Path) -> float:
    """Pixels above half the range once the image is normalized as omopfl's linking does (percentiles)."""
    pixels = pydicom.dcmread(path).pixel_array.astype(float)
    lo, hi = np.percentile(pixels, [1.0, 99.0])
    return float((np.clip((pixels - lo) / (hi - lo), 0, 1) > 0.5).sum())


def test_dicom_files_match_image_occurrence(world: World) -> None:
    brightness, widths, labels = [], [], []
    for s in world.summaries:
        site = load_site(s.adapter)
        rows = world.query(s, """
            SELECT i.person_id, i.local_path, i.image_study_uid, i.image_series_uid, i.image_occurrence_date,
                   p.procedure_concept_id, p.procedure_date, i.modality_concept_id
            FROM {cdm}.image_occurrence i
            JOIN {cdm}.procedure_occurrence p ON p.procedure_occurrence_id = i.procedure_occurrence_id""")
        assert len(rows) == s.linked_images == s.target_persons  # image_share=1.0
        outcome = {r[0] for r in world.query(s, TARGET_SQL + "SELECT person_id FROM outcome")}
        files = sorted(p.relative_to(site.image_root).as_posix() for p in site.image_root.rglob("*.dcm"))
        assert files == sorted(r[1] for r in rows)
        for person_id, local_path, study, series, day, procedure, procedure_day, modality in rows:
            assert not Path(local_path).is_absolute()
            ds = pydicom.dcmread(site.image_root / local_path)
            assert ds.PatientID == str(person_id)
            assert (ds.StudyInstanceUID, ds.SeriesInstanceUID) == (study, series)
            assert ds.Modality == "MR" and ds.StudyDate == str(day).replace("-", "")[:8]
            assert ds.pixel_array.shape == (64, 64) and ds.pixel_array.dtype == np.uint16
            assert procedure == modality == 4013636 and procedure_day == day
            brightness.append(_image_brightness(site.image_root / local_path))
            widths.append(_normalized_blob_area(site.image_root / local_path))
            labels.append(person_id in outcome)
    assert bayes_auc(np.array(brightness), np.array(labels)) > 0.6  # the blob carries outcome signal
    assert bayes_auc(np.array(widths), np.array(labels)) > 0.6  # and so does its width after normalization


def test_omics_manifest_matches_specimen_rows(world: World) -> None:
    expression, labels = [], []
    for s in world.summaries:
        site = load_site(s.adapter)
        with (site.omics_root / "manifest.csv").open(newline="") as handle:
            manifest = sorted((int(r["specimen_id"]), int(r["person_id"]), r["path"]) for r in csv.DictReader(handle))
        rows = sorted(world.query(s, "SELECT specimen_id, person_id, specimen_source_id FROM {cdm}.specimen"))
        assert manifest == rows and len(rows) == s.linked_omics_files > 0
        outcome = {r[0] for r in world.query(s, TARGET_SQL + "SELECT person_id FROM outcome")}
        for _, person_id, path in manifest:
            with (site.omics_root / path).open(newline="") as handle:
                profile = {r["gene"]: float(r["value"]) for r in csv.DictReader(handle)}
            assert list(profile) == list(OMICS_GENES)
            expression.append(profile["NPPB"] + profile["NPPA"] - profile["ATP2A2"])
            labels.append(person_id in outcome)
    assert bayes_auc(np.array(expression), np.array(labels)) > 0.6


def test_adapters_parse_and_point_at_the_sites(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    if world.url is not None:
        monkeypatch.setenv(DEFAULT_URL_ENV, world.url)
    for s in world.summaries:
        site = load_site(s.adapter)
        assert (site.name, site.cdm_schema, site.results_schema) == (s.site, s.cdm_schema, s.results_schema)
        assert site.vocabulary_schema == s.cdm_schema and site.min_cell_count == 10
        assert site.image_root.is_dir() and (site.omics_root / "manifest.csv").is_file()
        if world.url is None:
            assert site.duckdb_path.is_file() and site.url_env is None
        else:
            assert site.url_env == DEFAULT_URL_ENV and site.database_url() == world.url
        truth = json.loads((world.out / s.site / "truth.json").read_text())
        assert truth == json.loads(json.dumps(s.truth_dict()))
        (results,), = world.query(s, "SELECT COUNT(*) FROM " + qualified(s.results_schema, "cohort"))
        assert results == 0


def test_pooled_bayes_auc_is_well_above_chance(world: World) -> None:
    probability = np.concatenate([s.scores[0] for s in world.summaries])
    outcome = np.concatenate([s.scores[1] for s in world.summaries])
    assert len(probability) == sum(s.target_persons for s in world.summaries)
    assert bayes_auc(probability, outcome) > 0.7
    assert all(s.bayes_auc > 0.6 for s in world.summaries)


def test_vocabulary_tables(world: World) -> None:
    s = world.summaries[0]
    descendants = {r[0] for r in world.query(
        s, "SELECT descendant_concept_id FROM {cdm}.concept_ancestor WHERE ancestor_concept_id = 201826")}
    assert {201826, 443732, 45757363, 376065, 443729} <= descendants
    (self_rows,), = world.query(s, """SELECT COUNT(*) FROM {cdm}.concept_ancestor
        WHERE ancestor_concept_id = descendant_concept_id AND min_levels_of_separation = 0""")
    (standard,), = world.query(s, "SELECT COUNT(*) FROM {cdm}.concept WHERE standard_concept = 'S'")
    assert self_rows == standard
    (drug_link,), = world.query(s, """SELECT COUNT(*) FROM {cdm}.concept_ancestor
        WHERE ancestor_concept_id = 1503297 AND descendant_concept_id = 40163924""")
    assert drug_link == 1
    used = world.query(s, """SELECT DISTINCT x.condition_concept_id FROM {cdm}.condition_occurrence x
        LEFT JOIN {cdm}.concept c ON c.concept_id = x.condition_concept_id WHERE c.concept_id IS NULL""")
    assert used == []  # every concept the rows use is in the vocabulary subset


# ----------------------------------------------------------------------------------------------
# Determinism (backend fixture: each run gets its own database)
# ----------------------------------------------------------------------------------------------


def _fingerprint(url: str | None, out: Path, summaries: list[SiteSummary]) -> str:
    digest = hashlib.sha256()
    for s in summaries:
        engine = make_engine(url or load_site(s.adapter).database_url())
        with engine.connect() as conn:
            for table in sorted(s.rows):
                rows = conn.execute(sa.text(f"SELECT * FROM {qualified(s.cdm_schema, table)}")).fetchall()
                digest.update(f"{s.site}.{table}".encode())
                for line in sorted(repr(tuple(r)) for r in rows):
                    digest.update(line.encode())
        engine.dispose()
        digest.update(json.dumps(s.truth_dict(), sort_keys=True).encode())
        for path in sorted((out / s.site).rglob("*")):
            if path.is_file() and path.suffix in {".dcm", ".csv"}:
                digest.update(path.relative_to(out).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def test_same_seed_same_rows_and_files_different_seed_differs(backend, tmp_path: Path) -> None:
    def generate(tag: str, seed: int) -> str:
        url = None if backend.name == "duckdb" else backend.new_url(tmp_path, tag)
        out = tmp_path / tag
        summaries = run_synth(out, n_sites=2, persons=[160, 90], seed=seed, pg_url=url, image_share=0.5,
                              omics_share=0.5, progress=False, chunk_size=64)
        assert sum(s.linked_images for s in summaries) > 0
        return _fingerprint(url, out, summaries)

    first = generate("one", 5)
    assert generate("two", 5) == first
    assert generate("three", 6) != first


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


def test_split_persons() -> None:
    assert split_persons(None, 3) == [2000, 1200, 800]
    assert split_persons(4000, 3) == [2000, 1200, 800]
    assert sum(split_persons(1001, 4)) == 1001 and min(split_persons(5, 5)) == 1
    assert split_persons([5, 6], 2) == [5, 6]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_sites": 0}, "n_sites"),
        ({"n_sites": 101}, "n_sites"),
        ({"persons": [10, 20], "n_sites": 3}, "persons"),
        ({"persons": 2, "n_sites": 3}, "persons"),
        ({"persons": [10, 0, 5], "n_sites": 3}, "persons"),
        ({"image_share": 1.5}, "image_share"),
        ({"seed": -1}, "seed"),
        ({"pg_url": "mysql://u@h/db"}, "pg_url"),
        ({"pg_url_env": "lower-case"}, "pg_url_env"),
    ],
)
def test_bad_arguments_raise_config_error(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        run_synth(tmp_path, progress=False, **kwargs)
    assert "\n" not in str(info.value)
    assert not any(tmp_path.iterdir())


def test_unreachable_database_is_a_database_error(tmp_path: Path) -> None:
    with pytest.raises(DatabaseError, match="site_a") as info:
        run_synth(tmp_path, n_sites=1, persons=[10], pg_url="postgresql://nobody@127.0.0.1:1/none", progress=False)
    assert "nobody" not in str(info.value)


def test_bayes_auc() -> None:
    assert bayes_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert bayes_auc(np.array([0.5, 0.5]), np.array([0, 1])) == pytest.approx(0.5)
    assert bayes_auc(np.array([0.2, 0.3]), np.array([1, 1])) is None


def test_site_names_go_past_z_up_to_100_sites() -> None:
    from omopfl.synth import site_names

    names = site_names(100)
    assert names[:2] == ["site_a", "site_b"] and names[25:28] == ["site_z", "site_aa", "site_ab"]
    assert names[-1] == "site_cv" and len(set(names)) == 100
    assert all(name.removeprefix("site_").isalpha() for name in names)


def test_label_skew_gives_95_5_outcome_rates_and_keeps_the_cohorts(tmp_path: Path) -> None:
    kwargs = {"n_sites": 2, "persons": [3000, 3000], "seed": 11, "image_share": 0.0, "omics_share": 0.0,
              "progress": False}
    skewed = run_synth(tmp_path / "skewed", label_skew=0.95, **kwargs)
    plain = run_synth(tmp_path / "plain", **kwargs)
    assert skewed[0].outcome_rate < 0.12 < 0.80 < skewed[1].outcome_rate, [s.outcome_rate for s in skewed]
    for a, b in zip(skewed, plain, strict=True):
        assert a.persons == b.persons and a.t2dm_persons == b.t2dm_persons and a.target_persons == b.target_persons
    with pytest.raises(ConfigError, match="label_skew"):
        run_synth(tmp_path / "bad", label_skew=0.3, **kwargs)
    assert not (tmp_path / "bad").exists()
