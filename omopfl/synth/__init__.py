"""Deterministic synthetic multi-site OMOP CDM 5.4 generator, with linked DICOM images and omics files.

Each site is a full CDM (clinical tables, health system, ``cdm_source``, the shared
vocabulary subset of :mod:`omopfl.vocab`, the imaging extension's ``image_occurrence``)
plus an empty results schema.  Sites differ on purpose: size, age and sex mix, type 2
diabetes prevalence, the units labs are recorded in, missing values and planted dirty
rows.  The clinical story is the one the cohort and feature code is tested on:

* target cohort: incident type 2 diabetes, i.e. the first condition occurrence of
  201826 or a descendant, with at least 365 days of prior observation
  (``observation_period_start_date + 365 <= index``);
* outcome: heart failure (316139 or a descendant) 1..365 days after the index date;
* the outcome probability is a logistic function of age, sex, HbA1c, BMI, hypertension,
  creatinine and metformin use, plus a latent image signal (a blob in the person's MR
  slice) and a latent omics signal (a few genes of the person's expression profile).

Rows are generated in chunks of persons with vectorised numpy, each chunk from its
own generator seeded by ``(seed, site index, chunk index)``, and written with
:func:`omopfl.cdm.bulk_insert` inside one transaction per site, so memory stays flat in
the number of persons and the same seed and arguments give identical rows.

Everything a correct pipeline must find is returned as :class:`SiteSummary` and
written to ``<out_dir>/<site>/truth.json`` (counts and aggregates only, no rows).

This module is the entry point (:func:`run_synth`: checks, one site after the other, adapters); the
generator's parts live in modules of their own:

* :mod:`omopfl.synth.profiles`: how sites differ, their names, persons per site;
* :mod:`omopfl.synth.people`: the latent clinical story and the outcome model;
* :mod:`omopfl.synth.concepts`: the concept ids written and their source values;
* :mod:`omopfl.synth.rows`: row blocks, row ids and planted dirty rows of one chunk;
* :mod:`omopfl.synth.clinical`, :mod:`omopfl.synth.labs`: the clinical tables and the lab rows;
* :mod:`omopfl.synth.images`, :mod:`omopfl.synth.omics`: linked DICOM slices and expression files;
* :mod:`omopfl.synth.chunk`: one chunk's rows and files in their fixed order;
* :mod:`omopfl.synth.truth`: the ground truth (:class:`SiteSummary`);
* :mod:`omopfl.synth.write`: writing one site to its database and folders.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from omopfl.db import make_engine
from omopfl.errors import ConfigError
from omopfl.synth.omics import OMICS_GENES, OMICS_SIGNAL
from omopfl.synth.profiles import PROFILES, SiteProfile, label_skew_profiles, site_names, split_persons
from omopfl.synth.truth import SiteSummary, bayes_auc
from omopfl.synth.write import Target, generate_site

__all__ = [
    "SiteProfile",
    "PROFILES",
    "SiteSummary",
    "run_synth",
    "site_names",
    "split_persons",
    "bayes_auc",
    "OMICS_GENES",
    "OMICS_SIGNAL",
    "CHUNK_SIZE",
    "DEFAULT_URL_ENV",
    "DUCKDB_FILE",
]

CHUNK_SIZE = 25_000
DEFAULT_URL_ENV = "OMOPFL_SYNTH_PG_URL"
# Not "cdm.duckdb": DuckDB names the catalog after the file, and a catalog "cdm" makes the schema
# "cdm" ambiguous ("Ambiguous reference to catalog or schema").
DUCKDB_FILE = "omop.duckdb"
_ENV_NAME_RE = re.compile(r"^[A-Z_][A-Z0-9_]*$")


def _toml_string(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def _relative(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()


def _write_adapter(adapters_dir: Path, site: str, target: Target, site_dir: Path, url_env: str | None,
                   seed: int) -> Path:
    adapters_dir.mkdir(parents=True, exist_ok=True)
    path = adapters_dir / f"{site}.toml"
    if url_env is None:
        database = f"duckdb_path = {_toml_string(_relative(site_dir / DUCKDB_FILE, adapters_dir))}"
    else:
        database = f"url_env = {_toml_string(url_env)}"
    text = (
        f"# Synthetic site written by omopfl synth (seed {seed}); regenerate rather than edit.\n"
        "[site]\n"
        f"name = {_toml_string(site)}\n"
        "min_cell_count = 10\n\n"
        "[database]\n"
        f"{database}\n"
        f"cdm_schema = {_toml_string(target.cdm_schema)}\n"
        f"vocabulary_schema = {_toml_string(target.cdm_schema)}\n"
        f"results_schema = {_toml_string(target.results_schema)}\n\n"
        "[files]\n"
        f"image_root = {_toml_string(_relative(site_dir / 'images', adapters_dir))}\n"
        f"omics_root = {_toml_string(_relative(site_dir / 'omics', adapters_dir))}\n"
    )
    path.write_text(text, encoding="utf-8")
    return path


def _check_share(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"{name} must be a number from 0 to 1")
    return float(value)


@contextmanager
def _progress_bars(enabled: bool, sites: list[str], sizes: list[int]) -> Iterator[list[Callable[[int], None]]]:
    if not enabled:
        yield [lambda _n: None for _ in sites]
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("persons"),
                  TimeElapsedColumn()) as progress:
        tasks = [progress.add_task(site, total=size) for site, size in zip(sites, sizes, strict=True)]
        yield [lambda n, t=task: progress.advance(t, n) for task in tasks]


def run_synth(
    out_dir: Path,
    n_sites: int = 3,
    persons: int | Sequence[int] | None = None,
    seed: int = 42,
    pg_url: str | None = None,
    pg_url_env: str | None = None,
    image_share: float = 0.2,
    omics_share: float = 0.2,
    adapters_dir: Path | None = None,
    progress: bool = True,
    *,
    chunk_size: int = CHUNK_SIZE,
    label_skew: float | None = None,
) -> list[SiteSummary]:
    """Generate ``n_sites`` synthetic OMOP CDM sites, their linked files, adapters and truth.

    Parameters
    ----------
    out_dir:
        Folder of the sites: ``<out_dir>/<site>/`` holds ``omop.duckdb`` (embedded mode),
        ``images/``, ``omics/`` (with ``manifest.csv``) and ``truth.json``.
    n_sites:
        Number of sites, 1 to 100, named ``site_a`` .. ``site_z``, ``site_aa``, ...
    persons:
        ``None`` for the default spread (2000, 1200, 800, 600, 500, then 400 per site);
        an ``int`` is the *total* over all sites, split in proportion to that spread;
        a sequence gives each site's size.
    seed:
        Same seed and arguments give identical rows and files.
    pg_url:
        SQLAlchemy URL of a PostgreSQL database: each site becomes the schemas
        ``<site>_cdm`` and ``<site>_results`` (replaced if present).  ``None`` writes
        one DuckDB file per site, unless ``pg_url_env`` names a set environment variable.
    pg_url_env:
        Name of the environment variable the adapters use for the URL
        (default ``OMOPFL_SYNTH_PG_URL``); when ``pg_url`` is None and this variable is
        set, its value is used as ``pg_url``.
    image_share, omics_share:
        Share of target-cohort persons with a linked DICOM slice / expression profile.
    adapters_dir:
        Where the site adapter TOML files go (default ``<out_dir>/adapters``).
    progress:
        Show rich progress bars.
    chunk_size:
        Persons generated and written at a time (part of what determines the rows).
    label_skew:
        A non-IID label split, e.g. 0.95: sites a, c, e... have the outcome in 5% of their diabetics,
        sites b, d, f... in 95% (the outcome model's intercept is shifted per site; persons,
        diagnoses and the target cohort are as without it, later draws differ). None: each
        profile's own outcome rate.

    Returns
    -------
    list[SiteSummary]
        The ground truth of each site, also written to ``<out_dir>/<site>/truth.json``.
    """
    names = site_names(n_sites)
    sizes = split_persons(persons, n_sites)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError("seed must be a non-negative integer")
    image_share = _check_share(image_share, "image_share")
    omics_share = _check_share(omics_share, "omics_share")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigError("chunk_size must be a positive integer")
    if pg_url_env is not None and not _ENV_NAME_RE.match(pg_url_env):
        raise ConfigError("pg_url_env must be an environment variable name (A-Z, 0-9, _)")
    if pg_url is None and pg_url_env is not None and os.environ.get(pg_url_env, "").strip():
        pg_url = os.environ[pg_url_env].strip()
    url_env = (pg_url_env or DEFAULT_URL_ENV) if pg_url else None
    if pg_url:
        make_engine(pg_url, what="pg_url").dispose()  # validates the URL without connecting
        if sa.engine.make_url(pg_url).get_backend_name() != "postgresql":
            raise ConfigError("pg_url must be a postgresql:// URL (leave it empty for DuckDB files)")
    profiles = ([PROFILES[k % len(PROFILES)] for k in range(len(names))] if label_skew is None
                else label_skew_profiles(len(names), label_skew))
    out_dir = Path(out_dir)
    adapters_dir = Path(adapters_dir) if adapters_dir is not None else out_dir / "adapters"
    out_dir.mkdir(parents=True, exist_ok=True)

    summaries: list[SiteSummary] = []
    with _progress_bars(progress, names, sizes) as advances:
        for k, (site, size) in enumerate(zip(names, sizes, strict=True)):
            site_dir = out_dir / site
            site_dir.mkdir(parents=True, exist_ok=True)
            if pg_url:
                target = Target(pg_url, "postgresql", f"{site}_cdm", f"{site}_results")
            else:
                database = site_dir / DUCKDB_FILE
                for stale in (database, database.with_name(database.name + ".wal")):
                    stale.unlink(missing_ok=True)
                target = Target(f"duckdb:///{database}", "duckdb", "cdm", "results")
            summary = generate_site(site=site, site_index=k, profile=profiles[k], persons=size,
                                    seed=int(seed), target=target, site_dir=site_dir, image_share=image_share,
                                    omics_share=omics_share, chunk_size=chunk_size, advance=advances[k])
            summary.adapter = _write_adapter(adapters_dir, site, target, site_dir, url_env, int(seed))
            (site_dir / "truth.json").write_text(json.dumps(summary.truth_dict(), indent=2) + "\n", encoding="utf-8")
            summaries.append(summary)
    return summaries
