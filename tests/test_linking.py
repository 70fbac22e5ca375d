"""Linking persons to real DICOM and omics files, on DuckDB and PostgreSQL.

A small synthetic site (with DICOM slices and expression files on disk) is generated once
per backend; the target cohort is built in the database and its persons are linked.  Bad
files are made by hand (bytes overwritten, truncated, deleted, headers rewritten with
pydicom) and each must be counted under its reason and skipped.  Real-world DICOM comes
from pydicom's own test files (CT_small, MR_small, an RLE-compressed MR, a truncated MR).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import sqlalchemy as sa
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

import omopfl.linking.images as linking_images
from omopfl.config import SiteConfig, load_site
from omopfl.db import make_engine, qualified
from omopfl.errors import CdmError, ConfigError, DataError, OmopflError
from omopfl.linking import IMAGE_REPORT_KEYS, OMICS_REPORT_KEYS, link_images, link_omics
from omopfl.linking.candidates import mask_counts
from omopfl.study import StudyConfig, load_study

ROOT = Path(__file__).resolve().parents[1]
STUDY = load_study(ROOT / "examples" / "t2dm_hf" / "study.toml")
COHORT_ID = 101
IMAGE_FAILURES = [k for k in IMAGE_REPORT_KEYS
                  if k not in {"persons", "linked", "unlinked", "candidates", "files_checked", "cache_hits",
                               "cache_misses", "decoded", "no_candidate"}]


@dataclass
class Site:
    backend: str
    config: SiteConfig
    engine: sa.Engine
    truth: dict
    persons: pd.DataFrame  # the target cohort: person_id, index_date
    images: pd.DataFrame  # image_occurrence rows of the cohort's persons
    specimens: pd.DataFrame  # specimen rows of the cohort's persons


@pytest.fixture(scope="module")
def site(backend_name, database_factory, tmp_path_factory) -> Iterator[Site]:
    """One synthetic site with images and omics for most target persons, and its target cohort."""
    from omopfl.cohort import build_cohorts, load_definition
    from omopfl.synth import run_synth

    url = database_factory(backend_name, "linking")
    out = tmp_path_factory.mktemp("linksynth")
    env = f"OMOPFL_TEST_{uuid.uuid4().hex[:8].upper()}_URL"
    os.environ[env] = url
    pg = {"pg_url": url, "pg_url_env": env} if backend_name == "postgresql" else {}
    (summary,) = run_synth(out, n_sites=1, persons=[500], seed=5, image_share=0.7, omics_share=0.7,
                           progress=False, **pg)
    config = load_site(out / "adapters" / "site_a.toml")
    engine = make_engine(config.database_url())
    build_cohorts(engine, config, [(load_definition(ROOT / "cohorts" / "incident_t2dm.yaml"), COHORT_ID)],
                  replace=True)
    cohort, cdm = qualified(config.results_schema, "cohort"), config.cdm_schema
    with engine.connect() as conn:
        persons = pd.DataFrame([dict(r) for r in conn.execute(sa.text(
            f"SELECT subject_id AS person_id, cohort_start_date AS index_date FROM {cohort} "
            "WHERE cohort_definition_id = :id ORDER BY subject_id DESC"), {"id": COHORT_ID}).mappings().all()])
        images = pd.DataFrame([dict(r) for r in conn.execute(sa.text(
            "SELECT person_id, local_path, image_study_uid, image_series_uid, image_occurrence_date "
            f"FROM {qualified(cdm, 'image_occurrence')} ORDER BY person_id")).mappings().all()])
        specimens = pd.DataFrame([dict(r) for r in conn.execute(sa.text(
            "SELECT specimen_id, person_id, specimen_source_id, specimen_date "
            f"FROM {qualified(cdm, 'specimen')} ORDER BY person_id")).mappings().all()])
    images = images[images.person_id.isin(persons.person_id)].reset_index(drop=True)
    specimens = specimens[specimens.person_id.isin(persons.person_id)].reset_index(drop=True)
    yield Site(backend_name, config, engine, summary.truth_dict(), persons, images, specimens)
    engine.dispose()
    os.environ.pop(env, None)


def _copy_files(site: Site, tmp_path: Path) -> SiteConfig:
    """The site with its own copy of the image and omics files (tests may damage them)."""
    assert site.config.image_root is not None and site.config.omics_root is not None
    images, omics = tmp_path / "images", tmp_path / "omics"
    shutil.copytree(site.config.image_root, images)
    shutil.copytree(site.config.omics_root, omics)
    return dataclasses.replace(site.config, image_root=images, omics_root=omics)


def _no_secrets(texts: list[str], person_ids: list[int], paths: list[Path]) -> None:
    """No person id, file path or file name in any text that may leave the site."""
    for text in texts:
        for person_id in person_ids:
            assert str(person_id) not in text
        for path in paths:
            assert str(path) not in text
            assert path.name not in text
        assert "/" not in text and ".dcm" not in text and ".csv" not in text


def _reasons(report: dict, expected: dict[str, int]) -> dict[str, int]:
    return {k: report[k] for k in IMAGE_FAILURES if report[k] or k in expected}


# ----------------------------------------------------------------------------------------------- images
def test_images_link_and_headers_match(site: Site, tmp_path: Path) -> None:
    assert site.truth["linked_images"] == len(site.images) > 20
    with site.engine.connect() as conn:
        links = link_images(conn, site.config, STUDY, site.persons, tmp_path / "cache")
    report = links.report
    assert report["persons"] == len(site.persons) == site.truth["target_persons"]
    assert report["linked"] == report["candidates"] == report["files_checked"] == len(site.images)
    assert report["unlinked"] == report["no_candidate"] == len(site.persons) - len(site.images)
    assert _reasons(report, {}) == {}
    # Aligned with the persons frame (which is ordered by person_id descending).
    assert links.person_ids.tolist() == [p for p in site.persons.person_id if p in set(site.images.person_id)]
    assert site.persons.person_id.to_numpy()[links.positions].tolist() == links.person_ids.tolist()
    assert ((links.days_from_index >= -90) & (links.days_from_index <= -1)).all()
    # Independent check of what was linked: the header of each person's file names that person.
    for person_id, local_path in zip(site.images.person_id, site.images.local_path, strict=True):
        ds = pydicom.dcmread(site.config.image_root / local_path, stop_before_pixels=True)
        assert ds.PatientID == str(person_id) and ds.Modality == "MR"
    image = links.images.get(0)
    assert image.shape == (32, 32) and image.dtype == np.float32
    assert 0.0 <= image.min() < image.max() <= 1.0


def _rewrite(path: Path, **values: str) -> None:
    ds = pydicom.dcmread(path)
    for key, value in values.items():
        setattr(ds, key, value)
    ds.save_as(path)


def test_bad_images_are_counted_and_skipped(site: Site, tmp_path: Path) -> None:
    config = _copy_files(site, tmp_path)
    rows = site.images.iloc[:8]
    paths = [config.image_root / p for p in rows.local_path]
    ids = rows.person_id.tolist()
    # 0: bytes overwritten (preamble and DICM prefix gone) -> unreadable
    with paths[0].open("r+b") as fp:
        fp.write(os.urandom(300))
    # 1: cut inside the pixel data -> truncated
    os.truncate(paths[1], paths[1].stat().st_size - 1000)
    # 2: deleted -> missing_file
    paths[2].unlink()
    # 3: PatientID of another linked person -> mismatched_patient
    _rewrite(paths[3], PatientID=str(ids[7]))
    # 4: a CT in an MR study -> wrong_modality
    _rewrite(paths[4], Modality="CT")
    # 5, 6: UIDs that are not the CDM's
    _rewrite(paths[5], StudyInstanceUID=generate_uid())
    _rewrite(paths[6], SeriesInstanceUID=generate_uid())
    with site.engine.connect() as conn:
        links = link_images(conn, config, STUDY, site.persons, tmp_path / "cache")
    report = links.report
    assert _reasons(report, {}) == {"unreadable": 1, "truncated": 1, "missing_file": 1, "mismatched_patient": 1,
                                    "wrong_modality": 1, "mismatched_study": 1, "mismatched_series": 1}
    assert report["linked"] == len(site.images) - 7
    assert report["files_checked"] == report["candidates"] == len(site.images)
    assert not set(ids[:7]) & set(links.person_ids.tolist())
    assert ids[7] in links.person_ids.tolist()
    pixels = links.images.materialize()
    assert links.images.valid.all() and np.isfinite(pixels).all()
    _no_secrets([str(report), repr(links), str(links.masked_report(10))], site.persons.person_id.tolist(),
                [*paths, tmp_path])


def test_image_manifest(site: Site, tmp_path: Path) -> None:
    """A manifest gives the same links as image_occurrence; bad rows are counted."""
    config = _copy_files(site, tmp_path)
    manifest = tmp_path / "images.csv"
    first = int(site.images.person_id[0])
    with manifest.open("w", newline="", encoding="utf-8") as fp:
        writer = csv.writer(fp)
        writer.writerow(["person_id", "path", "study_uid", "series_uid", "date"])
        for row in site.images.itertuples():
            writer.writerow([row.person_id, row.local_path, row.image_study_uid, row.image_series_uid,
                             pd.Timestamp(row.image_occurrence_date).date().isoformat()])
        writer.writerow([first, "../../escape.dcm", "", "", pd.Timestamp(site.images.image_occurrence_date[0])
                         .date().isoformat()])  # newest on its day? ties: later rows win -> checked first
        writer.writerow(["not-a-number", "x.dcm", "", "", "2020-01-01"])
        writer.writerow([first, "x.dcm", "", "", "01/13/2020"])  # not ISO 8601
        writer.writerow([first, site.images.local_path[0], "", "", "1900-01-01"])  # outside the window
    with site.engine.connect() as conn:
        from_cdm = link_images(conn, config, STUDY, site.persons, tmp_path / "cache")
    from_manifest = link_images(None, config, STUDY, site.persons, tmp_path / "cache", manifest=manifest)
    assert from_manifest.person_ids.tolist() == from_cdm.person_ids.tolist()
    assert from_manifest.days_from_index.tolist() == from_cdm.days_from_index.tolist()
    report = from_manifest.report
    assert report["outside_root"] == 1 and report["bad_manifest_rows"] == 2
    assert report["candidates"] == len(site.images) + 1
    assert _reasons(report, {}) == {"outside_root": 1, "bad_manifest_rows": 2}


def test_lazy_pixels_are_decoded_once_and_cached(site: Site, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    decode = linking_images.decode_pixels

    def counting(*args, **kwargs):
        calls["n"] += 1
        return decode(*args, **kwargs)

    monkeypatch.setattr(linking_images, "decode_pixels", counting)  # what LazyImages calls
    cache = tmp_path / "cache"
    with site.engine.connect() as conn:
        links = link_images(conn, site.config, STUDY, site.persons, cache)
        n = len(links)
        assert calls["n"] == 0  # linking reads headers only
        first = links.images.materialize()
        assert calls["n"] == n and links.report["cache_misses"] == n and links.report["cache_hits"] == 0
        assert len(list(cache.glob("*.npy"))) == n
        second = links.images.materialize()
        assert calls["n"] == n and links.report["cache_hits"] == n and links.report["decoded"] == n
        assert first.dtype == np.float32 and first.shape == (n, 32, 32)
        assert np.array_equal(first, second)
        # A later run (new object, same cache) never decodes either.
        again = link_images(conn, site.config, STUDY, site.persons, cache)
        assert np.array_equal(again.images.materialize(), first)
        assert calls["n"] == n and again.report["cache_hits"] == n and again.report["cache_misses"] == 0
        # Another size is another cache entry.
        small = link_images(conn, site.config, dataclasses.replace(STUDY, imaging=dataclasses.replace(
            STUDY.imaging, size=16)), site.persons, cache)
        assert small.images.get(0).shape == (16, 16) and calls["n"] == n + 1
    # The pixels are the file's: 64x64 -> 2x2 block mean -> 1st..99th percentile to [0, 1].
    raw = pydicom.dcmread(site.config.image_root / site.images.local_path[0]).pixel_array.astype(float)
    block = raw.reshape(32, 2, 32, 2).mean(axis=(1, 3))
    lo, hi = np.percentile(block, [1, 99])
    position = links.person_ids.tolist().index(int(site.images.person_id[0]))
    np.testing.assert_allclose(first[position], np.clip((block - lo) / (hi - lo), 0, 1), atol=1e-6)


def test_changed_file_is_decoded_again(site: Site, tmp_path: Path) -> None:
    config = _copy_files(site, tmp_path)
    cache = tmp_path / "cache"
    with site.engine.connect() as conn:
        link_images(conn, config, STUDY, site.persons, cache).images.materialize()
        target = config.image_root / site.images.local_path[0]
        stat = target.stat()
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        links = link_images(conn, config, STUDY, site.persons, cache)
    links.images.materialize()
    assert links.report["cache_misses"] == 1 and links.report["cache_hits"] == len(links) - 1


def test_file_lost_after_linking_fails_safely(site: Site, tmp_path: Path) -> None:
    config = _copy_files(site, tmp_path)
    with site.engine.connect() as conn:
        links = link_images(conn, config, STUDY, site.persons, tmp_path / "cache", normalize="zscore")
    gone = config.image_root / site.images.local_path[0]
    gone.unlink()
    position = links.person_ids.tolist().index(int(site.images.person_id[0]))
    with pytest.raises(DataError) as failure:
        links.images.get(position)
    pixels = links.images.materialize()
    assert not links.images.valid[position] and links.images.valid.sum() == len(links) - 1
    assert (pixels[position] == 0).all()
    other = pixels[links.images.valid]
    np.testing.assert_allclose(other.mean(axis=(1, 2)), 0, atol=1e-5)  # z-scored
    np.testing.assert_allclose(other.std(axis=(1, 2)), 1, atol=1e-4)
    assert links.report["decode_failed"] == 1 and links.report["decoded"] == len(links) - 1
    # Aligned to the whole cohort (as a feature matrix is): unlinked and undecodable persons are masked.
    aligned, mask = links.materialize(site.persons.person_id.to_numpy())
    assert aligned.shape == (len(site.persons), 32, 32) and mask.sum() == len(links) - 1
    assert not mask[site.persons.person_id.tolist().index(int(site.images.person_id[0]))]
    assert (aligned[~mask] == 0).all()
    np.testing.assert_array_equal(aligned[mask], pixels[links.images.valid])
    _no_secrets([str(failure.value), str(links.report)], site.persons.person_id.tolist(), [gone, tmp_path])


# ----------------------------------------------------------------------------------------------- real DICOM
def _real(tmp_path: Path) -> tuple[SiteConfig, list[tuple[int, str, Path]]]:
    """pydicom's own test files in an image root, PatientID set to a person id (as a site pseudonymizes)."""
    root = tmp_path / "images"
    entries = []
    for person_id, name in [(901, "CT_small.dcm"), (902, "MR_small.dcm"), (903, "MR_small_RLE.dcm"),
                            (904, "MR_truncated.dcm"), (905, "rtplan.dcm")]:
        source = get_testdata_file(name)
        assert source is not None, name
        target = root / f"p{person_id}" / name
        target.parent.mkdir(parents=True)
        shutil.copy(source, target)
        if name == "MR_truncated.dcm":  # re-saving would complete it: patch the ID in place
            element = pydicom.dcmread(target, stop_before_pixels=True).get_item("PatientID")
            assert element.value == b"4MR1"
            with target.open("r+b") as fp:
                fp.seek(element.value_tell)
                fp.write(str(person_id).encode() + b" ")
        else:
            _rewrite(target, PatientID=str(person_id))
        entries.append((person_id, name, target))
    config = SiteConfig(name="real", url_env=None, cdm_schema="cdm", vocabulary_schema="cdm",
                        results_schema="results", image_root=root)
    return config, entries


def _study(modalities: tuple[str, ...], size: int) -> StudyConfig:
    return dataclasses.replace(STUDY, imaging=dataclasses.replace(STUDY.imaging, modalities=modalities, size=size))


def _reference(path: Path, size: int) -> np.ndarray:
    """Rescaled pixels (slope/intercept), block mean to ``size``."""
    ds = pydicom.dcmread(path)
    values = ds.pixel_array.astype(float) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    k = values.shape[0] // size
    return values.reshape(size, k, size, k).mean(axis=(1, 3))


def test_real_dicom_files_decode_resize_and_normalize(tmp_path: Path) -> None:
    config, entries = _real(tmp_path)
    persons = pd.DataFrame({"person_id": [e[0] for e in entries], "index_date": ["2020-01-01"] * len(entries)})
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as fp:
        writer = csv.writer(fp)
        writer.writerow(["person_id", "path", "study_uid", "series_uid"])
        for person_id, _, path in entries:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            writer.writerow([person_id, path.relative_to(config.image_root), ds.get("StudyInstanceUID", ""),
                             ds.get("SeriesInstanceUID", "")])
    links = link_images(None, config, _study(("CT", "MR"), 32), persons, tmp_path / "cache", manifest=manifest)
    assert links.person_ids.tolist() == [901, 902, 903]
    assert _reasons(links.report, {}) == {"truncated": 1, "wrong_modality": 1}  # MR_truncated; RTPLAN
    pixels = links.images.materialize()
    assert pixels.shape == (3, 32, 32) and pixels.dtype == np.float32
    assert pixels.min() == 0.0 and pixels.max() == 1.0
    for i, (_, name, path) in enumerate(entries[:3]):
        correlation = np.corrcoef(pixels[i].ravel(), _reference(path, 32).ravel())[0, 1]
        assert correlation > 0.98, name
    np.testing.assert_allclose(pixels[1], pixels[2], atol=1e-6)  # RLE-compressed copy of MR_small

    # RescaleSlope is applied: a negative slope turns the image over.
    flipped = tmp_path / "images" / "p901" / "CT_small.dcm"
    _rewrite(flipped, RescaleSlope="-1")
    again = link_images(None, config, _study(("CT", "MR"), 32), persons, tmp_path / "cache2", manifest=manifest)
    assert np.corrcoef(again.images.get(0).ravel(), pixels[0].ravel())[0, 1] < -0.98

    # Non-integer scale factors (128 -> 24, 64 -> 24) and the modality filter.
    mr_only = link_images(None, config, _study(("MR",), 24), persons, tmp_path / "cache3", manifest=manifest)
    assert mr_only.person_ids.tolist() == [902, 903] and mr_only.report["wrong_modality"] == 2
    image = mr_only.images.get(0)
    assert image.shape == (24, 24) and 0.0 <= image.min() < image.max() <= 1.0


def test_series_folder_uses_the_middle_slice(tmp_path: Path) -> None:
    """A path naming a series folder links its middle slice (by InstanceNumber) among the files that pass."""
    folder = tmp_path / "images" / "series"
    folder.mkdir(parents=True)
    source = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    pixels = source.pixel_array.copy()
    for number in (3, 1, 2, 4, 5):
        ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
        ds.PatientID, ds.InstanceNumber, ds.SOPInstanceUID = "77", number, generate_uid()
        ds.PixelData = (pixels[::-1] if number == 3 else pixels).tobytes()  # the middle slice is upside down
        if number == 5:
            ds.PatientID = "78"  # a stray slice of someone else: ignored, another slice passes
        ds.save_as(folder / f"slice{number}.dcm")
    (folder / "notes.txt").write_text("not dicom")
    config = SiteConfig(name="f", url_env=None, cdm_schema="cdm", vocabulary_schema="cdm", results_schema="results",
                        image_root=tmp_path / "images")
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"person_id,path,series_uid\n77,series,{source.SeriesInstanceUID}\n")
    persons = pd.DataFrame({"person_id": [77], "index_date": ["2020-01-01"]})
    links = link_images(None, config, _study(("MR",), 32), persons, tmp_path / "cache", manifest=manifest)
    assert links.person_ids.tolist() == [77] and links.report["files_checked"] == 1
    upright = link_images(None, dataclasses.replace(config, image_root=tmp_path / "images" / "series"),
                          _study(("MR",), 32), persons, tmp_path / "cache",
                          manifest=_one_row(tmp_path, "77,slice1.dcm")).images.get(0)
    np.testing.assert_allclose(links.images.get(0), upright[::-1], atol=1e-6)
    (folder / "slice5.dcm").unlink()
    for number in (1, 2, 3, 4):
        _rewrite(folder / f"slice{number}.dcm", Modality="CT")
    none = link_images(None, config, _study(("MR",), 32), persons, tmp_path / "cache", manifest=manifest)
    assert len(none) == 0 and none.report["unreadable"] == 1  # notes.txt sorts first: its reason is the folder's


def _one_row(tmp_path: Path, row: str) -> Path:
    manifest = tmp_path / f"one_{uuid.uuid4().hex[:6]}.csv"
    manifest.write_text(f"person_id,path\n{row}\n")
    return manifest


def test_real_dicom_registered_in_image_occurrence(tmp_path: Path) -> None:
    config, entries = _real(tmp_path)
    engine = make_engine(f"duckdb:///{tmp_path / 'omop.duckdb'}")
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA cdm"))
        conn.execute(sa.text(
            "CREATE TABLE cdm.image_occurrence (image_occurrence_id BIGINT, person_id BIGINT, "
            "procedure_occurrence_id BIGINT, local_path VARCHAR, image_occurrence_date DATE, "
            "image_study_uid VARCHAR, image_series_uid VARCHAR, modality_concept_id INTEGER)"))
        for k, (person_id, _, path) in enumerate(entries[:2]):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            conn.execute(sa.text("INSERT INTO cdm.image_occurrence VALUES (:k, :p, :k, :path, :d, :st, :se, 0)"), {
                "k": k, "p": person_id, "path": str(path.relative_to(config.image_root)), "d": "2019-12-01",
                "st": ds.StudyInstanceUID, "se": ds.SeriesInstanceUID})
        conn.execute(sa.text(  # an older row of 902 pointing at a file that is not there: never reached
            "INSERT INTO cdm.image_occurrence VALUES (9, 902, 9, 'gone.dcm', DATE '2019-06-01', 'x', 'y', 0)"))
    persons = pd.DataFrame({"person_id": [901, 902, 999], "index_date": pd.to_datetime(["2020-01-01"] * 3)})
    with engine.connect() as conn:
        links = link_images(conn, config, _study(("CT", "MR"), 16), persons, tmp_path / "cache")
        assert links.person_ids.tolist() == [901, 902] and links.days_from_index.tolist() == [-31, -31]
        assert links.report["no_candidate"] == 1 and links.report["candidates"] == 3
        assert links.report["files_checked"] == 2 and _reasons(links.report, {}) == {}
        assert links.images.materialize().shape == (2, 16, 16)
        missing_table = dataclasses.replace(config, cdm_schema="main")
        with pytest.raises(CdmError, match="image_occurrence"):
            link_images(conn, missing_table, STUDY, persons, tmp_path / "cache")
    engine.dispose()


# ----------------------------------------------------------------------------------------------- omics
def _expression(path: Path) -> dict[str, float]:
    with path.open(encoding="utf-8") as fp:
        return {row["gene"]: float(row["value"]) for row in csv.DictReader(fp)}


def test_omics_link_with_missing_genes_and_files(site: Site, tmp_path: Path) -> None:
    config = _copy_files(site, tmp_path)
    rows = site.specimens.iloc[:4]
    files = [config.omics_root / name for name in rows.specimen_source_id]
    ids = rows.person_id.tolist()
    lines = files[0].read_text().splitlines()
    files[0].write_text("\n".join(line for line in lines if line.split(",")[0] not in {"NPPA", "IL6"}) + "\n")
    files[1].unlink()
    files[2].write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff garbage")
    files[3].write_text(files[3].read_text().replace("\nGAPDH,", "\nGAPDH,n/a;"))
    with site.engine.connect() as conn:
        links = link_omics(conn, config, STUDY, site.persons)
        from_manifest = link_omics(conn, config, STUDY, site.persons, manifest=config.omics_root / "manifest.csv")
    report = links.report
    assert set(report) == set(OMICS_REPORT_KEYS)
    assert site.truth["linked_omics_files"] == len(site.specimens) > 20
    assert report["candidates"] == report["files_checked"] == len(site.specimens)
    assert report["linked"] == len(site.specimens) - 2
    assert report["missing_file"] == 1 and report["unreadable"] == 1 and report["invalid_values"] == 1
    assert report["files_missing_genes"] == 1
    assert {g: n for g, n in report["genes_missing"].items() if n} == {"NPPA": 1, "IL6": 1}
    assert report["files_with_extra_genes"] == report["linked"]  # the files hold 51 genes, the study 20
    frame = links.frame
    assert list(frame.columns) == list(STUDY.omics.genes)
    assert frame.index.tolist() == site.persons.person_id.tolist()
    assert frame.loc[ids[0], ["NPPA", "IL6"]].isna().all() and frame.loc[ids[0]].notna().sum() == 18
    assert frame.loc[ids[1]].isna().all() and frame.loc[ids[2]].isna().all()
    assert np.isnan(frame.loc[ids[3], "GAPDH"]) and frame.loc[ids[3]].notna().sum() == 19
    good = site.specimens.iloc[5]
    values = _expression(config.omics_root / good.specimen_source_id)
    expected = np.log1p([values[g] for g in STUDY.omics.genes])
    np.testing.assert_allclose(frame.loc[good.person_id].to_numpy(), expected, rtol=1e-12)
    unlinked = ~frame.index.isin(site.specimens.person_id)
    assert frame[unlinked].isna().all().all() and report["no_candidate"] == unlinked.sum()
    # The synthetic manifest (specimen_id, person_id, path; dates from the CDM) links the same.
    pd.testing.assert_frame_equal(from_manifest.matrix, frame)
    assert from_manifest.report == report
    _no_secrets([str(report), repr(links), str(links.masked_report(10))], site.persons.person_id.tolist(),
                [*files, tmp_path])


def test_omics_window_and_raw_values(site: Site, tmp_path: Path) -> None:
    """Specimens are taken 1..60 days before index: a window ending 61 days before index finds none."""
    with site.engine.connect() as conn:
        none = link_omics(conn, site.config, STUDY, site.persons, window=(-365, -61))
        raw = link_omics(conn, site.config, dataclasses.replace(
            STUDY, omics=dataclasses.replace(STUDY.omics, log1p=False)), site.persons)
    assert none.report["linked"] == 0 and none.report["no_candidate"] == len(site.persons)
    good = site.specimens.iloc[0]
    values = _expression(site.config.omics_root / good.specimen_source_id)
    np.testing.assert_allclose(raw.frame.loc[good.person_id].to_numpy(), [values[g] for g in STUDY.omics.genes])


def test_omics_manifest_checks_owner_and_specimen(site: Site, tmp_path: Path) -> None:
    rows = site.specimens.iloc[:3]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "specimen_id,person_id,path\n"
        f"{rows.specimen_id[0]},{rows.person_id[1]},{rows.specimen_source_id[0]}\n"  # someone else's specimen
        f"999999999,{rows.person_id[2]},{rows.specimen_source_id[2]}\n"  # not in the CDM
        f"{rows.specimen_id[2]},{rows.person_id[2]},{rows.specimen_source_id[2]}\n"
        f"x,{rows.person_id[2]},y.csv\n"
    )
    with site.engine.connect() as conn:
        links = link_omics(conn, site.config, STUDY, site.persons, manifest=manifest)
    assert links.report["mismatched_patient"] == 1 and links.report["unknown_specimen"] == 1
    assert links.report["bad_manifest_rows"] == 1 and links.report["linked"] == 1
    assert links.linked.sum() == 1 and links.frame.loc[rows.person_id[2]].notna().all()


# ----------------------------------------------------------------------------------------------- inputs
def test_bad_inputs_raise_safe_errors(tmp_path: Path) -> None:
    config = SiteConfig(name="s", url_env=None, cdm_schema="cdm", vocabulary_schema="cdm", results_schema="results")
    good = pd.DataFrame({"person_id": [12345678], "index_date": ["2020-01-01"]})
    manifest = tmp_path / "m.csv"
    manifest.write_text("person,file\n12345678,secret_12345678.dcm\n")
    specimens = tmp_path / "specimens.csv"
    specimens.write_text("specimen_id,person_id,path\n1,12345678,secret_12345678.csv\n")
    messages = []
    for call, error in [
        (lambda: link_images(None, config, STUDY, good[["person_id"]], tmp_path), DataError),
        (lambda: link_images(None, config, STUDY, pd.concat([good, good]), tmp_path), DataError),
        (lambda: link_images(None, config, STUDY, good.assign(index_date=[None]), tmp_path), DataError),
        (lambda: link_images(None, config, STUDY, good.assign(person_id=["x12345678"]), tmp_path), DataError),
        (lambda: link_images(None, config, STUDY, good, tmp_path), ConfigError),  # no image_root
        (lambda: link_images(None, config, STUDY, good, tmp_path, manifest=manifest), DataError),
        (lambda: link_images(None, config, STUDY, good, tmp_path, manifest=tmp_path / "nope.csv"), DataError),
        (lambda: link_images(None, config, STUDY, good, tmp_path, manifest=manifest, normalize="x"), ConfigError),
        (lambda: link_omics(None, config, STUDY, good), ConfigError),
        (lambda: link_omics(None, config, STUDY, good, manifest=manifest), DataError),
        (lambda: link_omics(None, config, STUDY, good, manifest=specimens), ConfigError),  # dates need the CDM
    ]:
        with pytest.raises(error) as failure:
            call()
        assert isinstance(failure.value, OmopflError)
        messages.append(str(failure.value))
    _no_secrets(messages, [12345678], [manifest, specimens, tmp_path])


def test_masked_report_and_empty_cohort(tmp_path: Path) -> None:
    config, _ = _real(tmp_path)
    empty = pd.DataFrame({"person_id": pd.Series([], dtype="int64"), "index_date": pd.Series([], dtype="object")})
    manifest = tmp_path / "m.csv"
    manifest.write_text("person_id,path\n")
    links = link_images(None, config, STUDY, empty, tmp_path / "cache", manifest=manifest)
    assert len(links) == 0 and links.images.materialize().shape == (0, 32, 32)
    masked = mask_counts({"a": 0, "b": 3, "c": 10, "d": {"g": 9}}, 10)
    assert masked == {"a": 0, "b": "<10", "c": 10, "d": {"g": "<10"}}
