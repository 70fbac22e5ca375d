"""`omopfl prepare` / `omopfl validate`: the whole site pipeline on real databases and real files."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import sqlalchemy as sa
from conftest import run_omopfl

from omopfl.cdm import bulk_insert
from omopfl.config import load_site
from omopfl.db import make_engine, qualified
from omopfl.errors import DataError
from omopfl.prepare import load_prepared, prepare_site
from omopfl.study import load_study

ROOT = Path(__file__).resolve().parents[1]
T2DM_STUDY = ROOT / "examples" / "t2dm_hf" / "study.toml"
EUNOMIA_STUDY = ROOT / "examples" / "eunomia_gibleed" / "study.toml"


def _synth_site(backend, tmp_path: Path, persons: int = 600):
    from omopfl.synth import run_synth

    env = f"OMOPFL_TEST_{uuid.uuid4().hex[:8].upper()}_URL"
    os.environ[env] = backend.url
    kwargs = {"pg_url": backend.url, "pg_url_env": env} if backend.name == "postgresql" else {}
    (summary,) = run_synth(tmp_path / "synth", n_sites=1, persons=[persons], seed=5, image_share=0.5,
                           omics_share=0.5, progress=False, **kwargs)
    site = load_site(tmp_path / "synth" / "adapters" / "site_a.toml")
    return site, summary.truth_dict(), env


def test_prepare_writes_a_dataset_the_client_loads(backend, tmp_path: Path) -> None:
    site, truth, env = _synth_site(backend, tmp_path)
    engine = make_engine(site.database_url())
    try:
        folder, manifest = prepare_site(engine, site, load_study(T2DM_STUDY), tmp_path / "prepared")
    finally:
        engine.dispose()
        os.environ.pop(env, None)
    prepared = load_prepared(folder)
    assert prepared.n == truth["target_persons"] == manifest["persons"]
    assert int(prepared.y.sum()) == truth["outcome_persons"]
    assert prepared.feature_names == manifest["feature_names"]
    assert prepared.x.shape == (prepared.n, len(prepared.feature_names)) and prepared.x.dtype == np.float32
    assert prepared.images is not None and prepared.images.shape[1:] == (32, 32)
    assert int(prepared.image_mask.sum()) == manifest["linking"]["images"]["linked"] == truth["linked_images"]
    assert prepared.omics is not None and prepared.omics.shape == (prepared.n, 20)
    assert manifest["validation"]["fatal_count"] == 0
    # the manifest pins what the data came from
    assert manifest["study_hash"] == load_study(T2DM_STUDY).hash
    assert len(manifest["cdm_snapshot_hash"]) == 64
    assert set(manifest["cohorts"]) == {"target", "outcome"}
    for name, digest in manifest["files"].items():
        import hashlib

        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest


def _plant_bad_input(site, engine) -> dict[str, int]:
    """Corrupt, delete and mismatch DICOM files, drop genes from an omics file, add bad lab rows."""
    cdm = site.cdm_schema
    with engine.connect() as conn:
        images = conn.execute(sa.text(
            f"SELECT person_id, local_path FROM {qualified(cdm, 'image_occurrence')} ORDER BY person_id")).all()
        target = conn.execute(sa.text(
            f"SELECT subject_id, cohort_start_date FROM {qualified(site.results_schema, 'cohort')} "
            "WHERE cohort_definition_id = 101 ORDER BY subject_id")).all()
    linked = {int(p) for p, _ in images}
    in_cohort = [(int(p), d) for p, d in target if int(p) in linked]
    paths = {int(p): site.image_root / path for p, path in images}
    corrupt, deleted, mismatched = (paths[p] for p, _ in in_cohort[:3])
    corrupt.write_bytes(b"\x00" * 64 + b"not a dicom file")
    deleted.unlink()
    ds = pydicom.dcmread(mismatched)
    ds.PatientID = "someone-else"
    ds.save_as(mismatched)
    # an omics file without two of the study's genes
    manifest = pd.read_csv(site.omics_root / "manifest.csv")
    in_cohort_ids = {p for p, _ in target}
    row = manifest[manifest["person_id"].isin(in_cohort_ids)].iloc[0]
    omics_file = site.omics_root / row["path"]
    expression = pd.read_csv(omics_file)
    expression[~expression["gene"].isin(["NPPB", "POSTN"])].to_csv(omics_file, index=False)
    # glucose rows the day before index: one impossible, one NaN, one in an unknown unit
    persons = [p for p, _ in target[:3]]
    index_dates = [pd.Timestamp(d) - pd.Timedelta(days=1) for _, d in target[:3]]
    value = [99999.0, float("nan"), 5.0]
    unit = [8840, 8840, 8554]  # mg/dL, mg/dL, % (no conversion from % to mg/dL for glucose)
    with engine.begin() as conn:
        bulk_insert(conn, cdm, "measurement", pd.DataFrame({
            "measurement_id": [900000001, 900000002, 900000003], "person_id": persons,
            "measurement_concept_id": [3004501] * 3, "measurement_date": [d.date() for d in index_dates],
            "measurement_type_concept_id": [32817] * 3, "value_as_number": value, "unit_concept_id": unit,
        }))
        # bulk loads turn NaN into NULL; a real IEEE NaN has to be written in SQL
        conn.execute(sa.text(f"UPDATE {qualified(cdm, 'measurement')} SET value_as_number = "
                             "CAST('NaN' AS DOUBLE PRECISION) WHERE measurement_id = 900000002"))
    return {"persons_with_bad_glucose": 3}


def test_bad_input_is_counted_not_fatal(backend, tmp_path: Path) -> None:
    site, truth, env = _synth_site(backend, tmp_path)
    engine = make_engine(site.database_url())
    study = load_study(T2DM_STUDY)
    try:
        from omopfl.prepare import ensure_cohorts

        ensure_cohorts(engine, site, study)
        _plant_bad_input(site, engine)
        folder, manifest = prepare_site(engine, site, study, tmp_path / "prepared")
    finally:
        engine.dispose()
        os.environ.pop(env, None)
    images = manifest["linking"]["images"]
    assert images["missing_file"] == 1
    assert images["unreadable"] + images["truncated"] >= 1
    assert images["mismatched_patient"] == 1
    assert images["linked"] == truth["linked_images"] - 3
    omics = manifest["linking"]["omics"]
    assert omics["files_missing_genes"] >= 1
    glucose = manifest["harmonization"]["features"]["glucose"]
    assert glucose["implausible"] >= 1
    assert glucose["non_finite"] >= 1
    assert glucose["unknown_unit"].get("%", 0) >= 1  # reported by its unit code, with a count
    assert manifest["validation"]["fatal_count"] == 0
    prepared = load_prepared(folder)
    glucose = prepared.x[:, prepared.feature_names.index("glucose")]
    assert np.nanmax(glucose) <= 1000.0  # the impossible value never reaches the matrix
    assert np.isfinite(prepared.images).all()


def test_empty_cohort_is_fatal_and_nothing_is_written(duckdb_backend, tmp_path: Path) -> None:
    site, _, env = _synth_site(duckdb_backend, tmp_path, persons=300)
    engine = make_engine(site.database_url())
    good = load_study(T2DM_STUDY)
    out = tmp_path / "prepared"
    try:
        folder, _ = prepare_site(engine, site, good, out)
        before = (folder / "manifest.json").read_text()
        empty_cohort = tmp_path / "empty.yaml"
        empty_cohort.write_text((ROOT / "cohorts" / "incident_t2dm.yaml").read_text()
                                .replace("prior_observation_days: 365", "prior_observation_days: 99999")
                                .replace("id: 101", "id: 111"))
        text = T2DM_STUDY.read_text().replace('"../../cohorts/incident_t2dm.yaml"', f'"{empty_cohort}"') \
            .replace('"../../cohorts/heart_failure.yaml"', f'"{ROOT / "cohorts" / "heart_failure.yaml"}"')
        (tmp_path / "study.toml").write_text(text)
        with pytest.raises(DataError, match="minPersons") as info:
            prepare_site(engine, site, load_study(tmp_path / "study.toml"), out)
    finally:
        engine.dispose()
        os.environ.pop(env, None)
    assert "\n" not in str(info.value)
    assert (folder / "manifest.json").read_text() == before  # previous dataset intact
    assert [p.name for p in out.iterdir()] == ["site_a"]  # no temp leftovers


@pytest.fixture(scope="module", params=["duckdb", "postgresql"])
def eunomia_adapter(request, database_factory, tmp_path_factory):
    from omopfl.eunomia import load_eunomia, write_adapter

    url = database_factory(request.param, "prepeunomia")
    engine = make_engine(url)
    with engine.begin() as conn:
        load_eunomia(conn, cdm_schema="cdm")
    engine.dispose()
    env = f"OMOPFL_TEST_{uuid.uuid4().hex[:8].upper()}_URL"
    os.environ[env] = url
    yield write_adapter(tmp_path_factory.mktemp("eunomia") / "eunomia.toml", "eunomia", url_env=env)
    os.environ.pop(env, None)


def test_eunomia_study_prepares_with_defects_as_warnings(eunomia_adapter: Path, tmp_path: Path, capsys) -> None:
    code = run_omopfl(["prepare", "--site", str(eunomia_adapter), "--study", str(EUNOMIA_STUDY), "--out",
                      str(tmp_path / "prepared"), "--json"])
    out = capsys.readouterr().out
    assert code == 0
    manifest = json.loads(out)
    assert manifest["cdm_version"] == "5.3"
    assert manifest["persons"] > 100 and manifest["outcomes"] > 0
    warnings = {(r["check"], r["table"]) for r in manifest["validation"]["results"]
                if r["level"] == "warning" and not r["passed"]}
    assert ("isPrimaryKey", "drug_exposure") in warnings
    assert ("isPrimaryKey", "measurement") in warnings
    assert manifest["validation"]["fatal_count"] == 0
    prepared = load_prepared(tmp_path / "prepared" / "eunomia")
    assert prepared.n == manifest["persons"]


def test_validate_command_prints_report_and_writes_nothing(eunomia_adapter: Path, tmp_path: Path, capsys,
                                                           monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code = run_omopfl(["validate", "--site", str(eunomia_adapter), "--study", str(EUNOMIA_STUDY), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["fatal_count"] == 0 and report["warning_count"] > 0
    assert not any(tmp_path.iterdir())


def test_site_refuses_a_study_it_cannot_serve(duckdb_backend, tmp_path: Path, capsys) -> None:
    """A site without an image root, or without a table the study needs, refuses before any work."""
    site, _, env = _synth_site(duckdb_backend, tmp_path, persons=200)
    adapter = site.source.read_text()
    no_images = tmp_path / "synth" / "adapters" / "no_images.toml"
    no_images.write_text("\n".join(line for line in adapter.splitlines() if not line.startswith("image_root")))
    code = run_omopfl(["prepare", "--site", str(no_images), "--study", str(T2DM_STUDY), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    os.environ.pop(env, None)
    assert code == 2 and err.count("\n") == 1
    assert "[linking.images] enabled needs [files] image_root" in err
    assert not (tmp_path / "out").exists()
