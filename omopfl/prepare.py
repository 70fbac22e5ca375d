"""Site data preparation: one pipeline from a site's CDM to a prepared dataset the client loads fast.

``prepare_site`` is the single entry point shared by ``omopfl prepare`` and (later) the Flower
ClientApp: cohorts (built if absent or changed) -> features computed in the database (streamed)
-> harmonization (units, categories, missingness indicators) -> linked DICOM images and omics
files -> validation (Great Expectations + CDM conformance) -> a dataset folder written atomically:

``<out>/<site>/``
    ``manifest.json``  hashes (cohort definitions, study, CDM snapshot), counts, the reports
    ``tabular.npz``    ``x`` (float32, NaN = missing), ``y``, ``feature_names``, ``missing_names``
    ``images.npy``     float32 (n, size, size) and ``image_mask.npy`` (n,) when images are linked
    ``omics.npy``      float32 (n, genes) when omics are linked
    ``persons.npy``    person ids (stays at the site; nothing here is ever sent)

Imputation and scaling use the federated statistics and happen at training time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from omopfl.config import SiteConfig
from omopfl.errors import ConfigError, DataError
from omopfl.splits import TEST_MASK_FILE
from omopfl.study import StudyConfig

__all__ = ["PreparedSite", "prepare_site", "load_prepared", "cdm_snapshot_hash", "ensure_cohorts", "check_can_serve",
           "dataset_folder"]

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@dataclass
class PreparedSite:
    """A prepared site dataset, as loaded by the training client."""

    site: str
    x: np.ndarray
    y: np.ndarray
    feature_names: list[str]
    images: np.ndarray | None = None
    image_mask: np.ndarray | None = None
    omics: np.ndarray | None = None
    gene_names: list[str] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)
    test_mask: np.ndarray | None = None  # the study's fixed test set ([split]), one bool per row

    @property
    def n(self) -> int:
        return int(self.y.shape[0])


def cdm_snapshot_hash(conn: sa.Connection, site: SiteConfig) -> str:
    """A cheap fingerprint of the CDM's state: version, row counts and latest dates of the core tables."""
    from omopfl.db import detect_cdm_version, existing_tables, qualified

    tables = existing_tables(conn, site.cdm_schema)
    parts: list[str] = [detect_cdm_version(conn, site.cdm_schema)]
    for table, date_column in (("person", None), ("observation_period", "observation_period_end_date"),
                               ("condition_occurrence", "condition_start_date"),
                               ("drug_exposure", "drug_exposure_start_date"),
                               ("measurement", "measurement_date"), ("image_occurrence", None),
                               ("specimen", None)):
        if table not in tables:
            parts.append(f"{table}:absent")
            continue
        select = "count(*)" + (f", max({date_column})" if date_column else "")
        row = conn.execute(sa.text(f"SELECT {select} FROM {qualified(site.cdm_schema, table)}")).one()
        parts.append(f"{table}:" + ":".join(str(v) for v in row))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def ensure_cohorts(engine: sa.Engine, site: SiteConfig, study: StudyConfig, progress: bool = False) -> dict[str, Any]:
    """Build the study's target and outcome cohorts unless built already from the same definitions.

    Returns
    -------
    dict
        ``{"target": {"id", "hash", "rebuilt"}, "outcome": {...}}`` (and ``"test"`` for a cohort split).
    """
    from omopfl.cohort import build_cohorts, load_definition
    from omopfl.db import existing_tables, qualified, sql_text

    definitions: dict[str, Any] = {}
    ids: dict[str, int] = {}
    roles = study.cohort_roles()
    for role in roles:
        file = study.cohort_file(role)
        if file is None:  # a cohort built at the site beforehand, by id
            ids[role] = study.cohort_ids[role]
            continue
        definition = load_definition(file)
        cohort_id = study.cohort_ids.get(role, definition.default_id)
        if cohort_id is None:
            key = "[split] test_cohort" if role == "test" else f"[cohorts] {role}"
            raise DataError(f"{study.source}: {key}: {file.name} carries no cohort id; "
                            f"write {key.split()[-1]} = {{file = \"{file.name}\", id = <id>}} in the study")
        definitions[role], ids[role] = definition, int(cohort_id)
    if len(set(ids.values())) != len(ids):
        raise DataError(f"{study.source}: two of the study's cohorts ({', '.join(roles)}) have the same id; "
                        "give each its own id in [cohorts] / [split] test_cohort")
    built: dict[int, str | None] = {}
    with engine.connect() as conn:
        tables = existing_tables(conn, site.results_schema)
        if "cohort_definition" in tables:
            table = qualified(site.results_schema, "cohort_definition")
            rows = conn.execute(sa.text(sql_text("cohort_definition_hashes", cohort_definition=table))).all()
            built = {int(r[0]): str(r[1]) for r in rows}
        for role in roles:  # a cohort built by other tools at the site: rows in cohort only
            if role not in definitions and ids[role] not in built and "cohort" in tables:
                cohort = qualified(site.results_schema, "cohort")
                found = conn.execute(sa.text(sql_text("cohort_has_rows", cohort=cohort)), {"id": ids[role]}).first()
                if found is not None:
                    built[ids[role]] = None
    for role in roles:
        if role not in definitions and ids[role] not in built:
            key = "[split] test_cohort" if role == "test" else f"[cohorts] {role}"
            raise DataError(f"site {site.name}: {key} names cohort id {ids[role]}, which is not built "
                            f"in {site.results_schema}; run omopfl cohort build <definition> --site "
                            f"{site.source.name if site.source else '<adapter>'} --id {ids[role]} first")
    todo = [(d, ids[role]) for role, d in definitions.items() if built.get(ids[role]) != d.hash]
    if todo:
        build_cohorts(engine, site, todo, replace=True, progress=progress)
    rebuilt = {cohort_id for _, cohort_id in todo}
    out: dict[str, Any] = {}
    for role in roles:
        d = definitions.get(role)
        out[role] = ({"id": ids[role], "hash": d.hash, "name": d.name, "rebuilt": ids[role] in rebuilt} if d else
                     {"id": ids[role], "hash": built[ids[role]], "name": f"cohort {ids[role]} (built at the site)",
                      "rebuilt": False})
    return out


def check_can_serve(conn: sa.Connection, site: SiteConfig, study: StudyConfig) -> None:
    """Refuse, with one clear error, a study this site cannot serve (before any work is done).

    Raises
    ------
    ConfigError
        Naming the study key and the site's missing piece (adapter key or CDM table).
    """
    from omopfl.db import existing_tables

    where = f"site {site.name} cannot serve study {study.name}"
    tables = existing_tables(conn, site.cdm_schema)
    needed = study.tables_read()
    for table, key in needed.items():
        if table not in tables:
            raise ConfigError(f"{where}: {key} needs CDM table {table}, absent from schema {site.cdm_schema}")
    if study.imaging.enabled and site.image_root is None:
        raise ConfigError(f"{where}: [linking.images] enabled needs [files] image_root in {site.source}")
    if study.omics.enabled and site.omics_root is None:
        raise ConfigError(f"{where}: [linking.omics] enabled needs [files] omics_root in {site.source}")


_TMP_MARK = ".tmp"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _recover(final: Path) -> None:
    """Finish what a killed run left: the previous dataset back in place, dead runs' temp folders removed."""
    backup = final.with_name(f".{final.name}.old")
    if not final.exists() and backup.is_dir():
        backup.rename(final)  # killed between the two renames of the fallback commit
    if not final.parent.is_dir():
        return
    for leftover in final.parent.glob(f".{final.name}{_TMP_MARK}*"):
        pid = leftover.name[len(f".{final.name}{_TMP_MARK}"):].split(".", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)) and leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


def _atomic_dir(final: Path) -> Path:
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        _recover(final)
        return Path(tempfile.mkdtemp(prefix=f".{final.name}{_TMP_MARK}{os.getpid()}.", dir=final.parent))
    except OSError as exc:
        raise ConfigError(f"{final.parent}: cannot write the dataset there ({type(exc).__name__}); "
                          "check --out") from None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is unavailable."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _commit_dir(tmp: Path, final: Path) -> None:
    """Replace ``final`` by ``tmp`` (same filesystem); the old dataset stays until the new one is complete.

    Where the kernel can swap two folders atomically, a signal at any point leaves either the old or the
    new dataset in place; otherwise the old one is renamed aside first and :func:`_recover` puts it back if
    the process dies between the two renames.
    """
    if final.is_dir() and _exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous dataset
        return
    backup = final.with_name(f".{final.name}.old")
    if backup.exists():
        shutil.rmtree(backup)
    if final.exists():
        final.rename(backup)
    try:
        tmp.rename(final)
    except BaseException:
        if backup.exists() and not final.exists():
            backup.rename(final)
        raise
    if backup.exists():
        shutil.rmtree(backup)


def dataset_folder(out_dir: str | Path, site: SiteConfig) -> Path:
    """``<out_dir>/<site name>``, refusing a site name that is not a plain folder name inside ``out_dir``."""
    out = Path(out_dir)
    name = site.name
    folder = out / name
    if (name in {"", ".", ".."} or "/" in name or "\\" in name or name.startswith(".")
            or folder.name != name or folder.parent != out):
        where = f"{site.source}: " if site.source else ""
        raise ConfigError(f"{where}[site] name must be a plain folder name (no '.', '..' or separators)")
    return folder


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if hasattr(value, "to_dict"):
        return _json_safe(value.to_dict())
    return value


def _hash_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_prepared(folder: str | Path) -> PreparedSite:
    """Load a prepared site dataset (fast: numpy arrays only).

    Raises
    ------
    DataError
        If the folder holds no complete prepared dataset.
    """
    folder = Path(folder)
    if not folder.exists():
        _recover(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise DataError(f"{folder}: no prepared dataset here (manifest.json missing); run omopfl prepare")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise DataError(f"{folder}: manifest.json is unreadable; run omopfl prepare again") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{folder}: prepared with another omopfl format; run omopfl prepare again")
    with np.load(folder / "tabular.npz", allow_pickle=False) as data:
        x, y = data["x"], data["y"]
        names = [str(n) for n in data["feature_names"]]
    images = np.load(folder / "images.npy", mmap_mode="r") if (folder / "images.npy").exists() else None
    image_mask = np.load(folder / "image_mask.npy") if (folder / "image_mask.npy").exists() else None
    omics = np.load(folder / "omics.npy") if (folder / "omics.npy").exists() else None
    test_mask = np.load(folder / TEST_MASK_FILE) if (folder / TEST_MASK_FILE).exists() else None
    return PreparedSite(
        site=manifest["site"], x=x, y=y, feature_names=names, images=images, image_mask=image_mask, omics=omics,
        gene_names=list(manifest.get("genes", [])), manifest=manifest, test_mask=test_mask,
    )


def write_prepared(
    final: Path,
    site: SiteConfig,
    frame: pd.DataFrame,
    feature_names: list[str],
    manifest: dict[str, Any],
    images: tuple[np.ndarray, np.ndarray] | None = None,
    omics: np.ndarray | None = None,
    covariates: Any = None,
    test_mask: np.ndarray | None = None,
) -> Path:
    """Write a prepared dataset atomically (a temp folder renamed into place).

    ``test_mask``: the study's fixed test set (``[split]``, :mod:`omopfl.splits`), written as ``test_mask.npy``.

    ``covariates``: an :class:`omopfl.covariates.CovariateMatrix` (rows in the frame's order), written as
    ``covariates.npz`` (CSR arrays and the covariate ids).
    """
    tmp = _atomic_dir(final)
    try:
        x = frame[feature_names].to_numpy(dtype=np.float32, na_value=np.nan)
        y = frame["label"].to_numpy(dtype=np.float32)
        np.savez(tmp / "tabular.npz", x=x, y=y, feature_names=np.array(feature_names, dtype=str))
        np.save(tmp / "persons.npy", frame["person_id"].to_numpy(dtype=np.int64))
        files = ["tabular.npz", "persons.npy"]
        if images is not None:
            np.save(tmp / "images.npy", images[0].astype(np.float32, copy=False))
            np.save(tmp / "image_mask.npy", images[1].astype(bool, copy=False))
            files += ["images.npy", "image_mask.npy"]
        if omics is not None:
            np.save(tmp / "omics.npy", omics.astype(np.float32, copy=False))
            files.append("omics.npy")
        if covariates is not None:  # [covariates] (issue 13b)
            from omopfl.covariates import COVARIATES_FILE, save_matrix

            save_matrix(tmp / COVARIATES_FILE, covariates)
            files.append(COVARIATES_FILE)
        if test_mask is not None:
            np.save(tmp / TEST_MASK_FILE, np.asarray(test_mask, dtype=bool))
            files.append(TEST_MASK_FILE)
        manifest = {**manifest, "format_version": FORMAT_VERSION, "site": site.name,
                    "files": {name: _hash_file(tmp / name) for name in files}}
        (tmp / MANIFEST).write_text(json.dumps(_json_safe(manifest), indent=2, sort_keys=True))
        _commit_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def prepare_site(
    engine: sa.Engine,
    site: SiteConfig,
    study: StudyConfig,
    out_dir: str | Path,
    *,
    allow_fatal: bool = False,
    write: bool = True,
    progress: bool = False,
) -> tuple[Path | None, dict[str, Any]]:
    """Prepare one site's dataset for the study.

    Returns
    -------
    (folder or None, manifest)
        The folder written (``None`` when ``write=False``, as ``omopfl validate`` does) and the manifest
        with every report.

    Raises
    ------
    DataError
        On a fatal validation failure unless ``allow_fatal``; nothing is written then.
    """
    from omopfl.db import detect_cdm_version

    started = time.perf_counter()
    if write:
        dataset_folder(out_dir, site)  # refuse a bad folder before any work
    with engine.connect() as conn:
        check_can_serve(conn, site, study)
    cohorts = ensure_cohorts(engine, site, study, progress=progress)
    with engine.connect() as conn:
        cdm_version = detect_cdm_version(conn, site.cdm_schema)
        snapshot = cdm_snapshot_hash(conn, site)
        frame, feature_names, harmonization = _features(conn, site, study, cohorts)
        images, image_report = _images(conn, site, study, frame, Path(out_dir))
        omics, omics_report = _omics(conn, site, study, frame)
        covariates, covariate_report = _covariates(conn, site, study, cohorts, frame)
        test_mask = _test_mask(conn, site, study, cohorts, frame)
        report = _validate(conn, site, study, frame, cdm_version)
    manifest: dict[str, Any] = {
        "study": study.name,
        "study_hash": study.hash,
        "dataset_hash": study.dataset_hash,
        "cohorts": cohorts,
        "cdm_version": cdm_version,
        "cdm_snapshot_hash": snapshot,
        "persons": len(frame),
        "outcomes": int(frame["label"].sum()) if len(frame) else 0,
        "feature_names": feature_names,
        "genes": list(study.omics.genes) if omics is not None else [],
        "harmonization": harmonization,
        "linking": {"images": image_report, "omics": omics_report},
        **({"covariates": covariate_report} if covariate_report else {}),
        **({"split": {"method": study.split.method, "test_persons": int(test_mask.sum())}}
           if test_mask is not None else {}),
        "validation": report.to_dict(),
        "prepared_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 3),
    }
    report.raise_if_fatal(allow_fatal=allow_fatal or study.validation.allow_fatal)
    if not write:
        return None, _json_safe(manifest)
    folder = write_prepared(dataset_folder(out_dir, site), site, frame, feature_names, manifest, images, omics,
                            covariates=covariates, test_mask=test_mask)
    return folder, json.loads((folder / MANIFEST).read_text())


# ----------------------------------------------------------------------------- stages
def _features(conn: sa.Connection, site: SiteConfig, study: StudyConfig, cohorts: dict[str, Any]):
    from omopfl import features, harmonize

    read = features.read_features(conn, site, study, cohorts["target"]["id"], cohorts["outcome"]["id"])
    frame, feature_names, report = harmonize.harmonize_frame(read.frame, study, unknown_units=read.unknown_units)
    warnings = unit_warnings(study, read.frame, read.unknown_units)
    for warning in warnings:
        print(f"warning: site {site.name}: {warning}", file=sys.stderr)
    return frame, feature_names, {**_json_safe(report), "warnings": warnings}


def _test_mask(conn: sa.Connection, site: SiteConfig, study: StudyConfig, cohorts: dict[str, Any],
               frame: pd.DataFrame) -> np.ndarray | None:
    """The study's fixed test set over the frame's rows (``[split]``), or None for the random split."""
    from omopfl.db import qualified, sql_text
    from omopfl.splits import hash_test_mask

    persons = frame["person_id"].to_numpy(dtype=np.int64)
    if study.split.method == "hash":
        return hash_test_mask(persons.tolist(), study.split.test_fraction, study.split.seed)
    if study.split.method != "cohort":
        return None
    rows = conn.execute(sa.text(sql_text("cohort_subjects", cohort=qualified(site.results_schema, "cohort"))),
                        {"id": int(cohorts["test"]["id"])}).all()
    return np.isin(persons, np.array([int(r[0]) for r in rows], dtype=np.int64))


def _is_unitless_code(code: str) -> bool:
    from omopfl.harmonize import NO_VALUE

    return code in (NO_VALUE, "1") or (code.startswith("{") and code.endswith("}"))


def unit_warnings(study: StudyConfig, frame: pd.DataFrame, unknown_units: dict[str, dict[str, int]]) -> list[str]:
    """A warning per value feature with a real unit whose rows were all recorded without a unit.

    Such a feature is missing for everyone at the site although it has values: the study should declare it
    unitless (``unit = "1"``) if it is, or the site map its units.  ``frame`` is the feature frame as read.
    """
    out = []
    for m in study.measurements:
        counts = unknown_units.get(m.name, {})
        if m.unitless or not counts or not all(_is_unitless_code(code) for code in counts):
            continue
        if m.name in frame.columns and m.can_be_missing and frame[m.name].notna().any():
            continue
        if not m.can_be_missing and m.name in frame.columns and (frame[m.name] > 0).any():
            continue
        rows = sum(counts.values())
        out.append(f"[[features.measurements]] {m.name}: all {rows} row(s) in the window have no unit or a "
                   f"unitless one, none in {m.unit}; the feature is missing for everyone at this site "
                   "(declare unit = \"1\" if it is unitless, or map the site's units)")
    return out


def _images(conn: sa.Connection, site: SiteConfig, study: StudyConfig, frame: pd.DataFrame, out_dir: Path):
    if not study.imaging.enabled:
        return None, {"enabled": False}
    from omopfl.linking import link_images

    # Decoded pixels are cached per site under the user's cache folder (like translated cohort SQL),
    # so `omopfl validate` writes nothing into the working folder and later runs never decode again.
    base = Path(os.environ.get("OMOPFL_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                / "omopfl")
    cache = Path(os.environ.get("OMOPFL_IMAGE_CACHE", base / "images" / site.name))
    links = link_images(conn, site, study, frame[["person_id", "index_date"]], cache_dir=cache)
    array, mask = links.materialize(frame["person_id"].to_numpy())
    return (array, mask), _json_safe(links.report)


def _omics(conn: sa.Connection, site: SiteConfig, study: StudyConfig, frame: pd.DataFrame):
    if not study.omics.enabled:
        return None, {"enabled": False}
    from omopfl.linking import link_omics

    links = link_omics(conn, site, study, frame[["person_id", "index_date"]])
    matrix = links.matrix.reindex(frame["person_id"].to_numpy())[list(study.omics.genes)]
    return matrix.to_numpy(dtype=np.float32, na_value=np.nan), _json_safe(links.report)


def _covariates(conn: sa.Connection, site: SiteConfig, study: StudyConfig, cohorts: dict[str, Any],
                frame: pd.DataFrame):
    """The study's covariate set as a sparse matrix in the frame's row order (issue 13b), and its report."""
    if study.covariates is None:
        return None, {}
    from omopfl.covariates import covariate_matrix

    matrix = covariate_matrix(conn, site, cohorts["target"]["id"], study.covariates,
                              frame["person_id"].to_numpy(dtype=np.int64))
    settings = study.covariates
    return matrix, {"analyses": list(settings.analyses), "covariates": int(matrix.matrix.shape[1]),
                    "nonzeros": int(matrix.matrix.nnz), "fixed_list": settings.covariate_ids is not None,
                    "list_sha256": settings.list_sha256}


def _validate(conn: sa.Connection, site: SiteConfig, study: StudyConfig, frame: pd.DataFrame, version: str):
    from omopfl.validation import validate

    return validate(conn, site, study, frame, version)
