"""Write one synthetic site: its CDM into the database (one transaction), its images and omics files beside it.

Part of the synthetic generator (:mod:`omopfl.synth`).  Persons are generated and written a chunk at a
time (:func:`omopfl.synth.chunk.build_chunk`) with :func:`omopfl.cdm.bulk_insert`, so memory stays flat
in the number of persons; primary keys are added once every row is in.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import sqlalchemy as sa

from omopfl import vocab
from omopfl.cdm import CDM_TABLES, bulk_insert, create_cdm, create_results, table_columns
from omopfl.db import describe_driver_error, is_driver_error, make_engine, quote_identifier
from omopfl.errors import DatabaseError
from omopfl.synth.chunk import build_chunk
from omopfl.synth.concepts import FEMALE, MALE
from omopfl.synth.images import write_dicom
from omopfl.synth.omics import write_omics
from omopfl.synth.profiles import PERSON_ID_STRIDE, SiteProfile
from omopfl.synth.truth import SiteSummary, SiteTruth

__all__ = ["ID_TABLES", "Target", "generate_site", "health_system"]


def health_system(site: str) -> dict[str, pd.DataFrame]:
    """The site's ``location``, ``care_site``, ``provider`` and ``cdm_source`` rows."""
    cities = ("Northtown", "Riverside", "Hillview")
    location = pd.DataFrame({
        "location_id": [1, 2, 3],
        "city": list(cities),
        "location_source_value": [f"{site}-loc-{i}" for i in (1, 2, 3)],
    })
    care_site = pd.DataFrame({
        "care_site_id": [1, 2, 3],
        "care_site_name": [f"{site} hospital", f"{site} clinic", f"{site} urgent care"],
        "place_of_service_concept_id": [8756, 8716, 8782],
        "location_id": [1, 2, 3],
        "care_site_source_value": [f"{site}-cs-{i}" for i in (1, 2, 3)],
    })
    provider_ids = np.arange(1, 21)
    provider = pd.DataFrame({
        "provider_id": provider_ids,
        "provider_name": [f"Provider {i}" for i in provider_ids],
        "care_site_id": (provider_ids - 1) % 3 + 1,
        "year_of_birth": 1950 + (provider_ids * 7) % 40,
        "gender_concept_id": np.where(provider_ids % 2 == 0, FEMALE, MALE),
        "provider_source_value": [f"{site}-pr-{i}" for i in provider_ids],
    })
    cdm_source = pd.DataFrame({
        "cdm_source_name": [f"omopfl synthetic {site}"],
        "cdm_source_abbreviation": [site],
        "cdm_holder": ["omopfl"],
        "source_description": ["Deterministic synthetic data (omopfl.synth); no real patients."],
        "source_release_date": np.array(["2025-01-01"], dtype="datetime64[D]"),
        "cdm_release_date": np.array(["2025-01-01"], dtype="datetime64[D]"),
        "cdm_version": ["v5.4"],
        "cdm_version_concept_id": [0],  # the CDM-version concept is not in the vocabulary subset
        "vocabulary_version": [vocab.VOCABULARY_VERSION],
    })
    return {"location": location, "care_site": care_site, "provider": provider, "cdm_source": cdm_source}


#: Tables whose row ids the chunks of a site share (each starts at 1).
ID_TABLES = ("observation_period", "visit_occurrence", "condition_occurrence", "drug_exposure",
             "procedure_occurrence", "measurement", "observation", "specimen", "image_occurrence")


@dataclass(frozen=True)
class Target:
    """Where one site's CDM goes."""

    url: str
    backend: str
    cdm_schema: str
    results_schema: str


@contextmanager
def site_connection(target: Target, site: str) -> Iterator[sa.Connection]:
    """One transaction on the site's database; driver errors become one-line :class:`DatabaseError`."""
    engine = make_engine(target.url, what=f"site {site} database")
    try:
        try:
            conn = engine.connect()
        except sa.exc.DBAPIError:
            raise DatabaseError(f"cannot connect to the database of {site}; check the URL and the server") from None
        try:
            with conn.begin():
                yield conn
        except Exception as exc:
            if not is_driver_error(exc):
                raise
            raise DatabaseError(f"writing {site} failed ({describe_driver_error(exc)})") from None
        finally:
            conn.close()
    finally:
        engine.dispose()


def add_primary_keys(conn: sa.Connection, schema: str) -> None:
    """Add the CDM tables' primary keys (after the bulk load, which is faster without them)."""
    for table in CDM_TABLES:
        keys = [c.name for c in table_columns(table) if c.primary_key]
        if keys:
            columns = ", ".join(quote_identifier(k) for k in keys)
            conn.execute(sa.text(
                f"ALTER TABLE {quote_identifier(schema)}.{quote_identifier(table)} ADD PRIMARY KEY ({columns})"))


def generate_site(*, site: str, site_index: int, profile: SiteProfile, persons: int, seed: int, target: Target,
                  site_dir: Path, image_share: float, omics_share: float, chunk_size: int,
                  advance: Callable[[int], None]) -> SiteSummary:
    """Write one site (CDM, results schema, files) and return its truth; ``advance(n)`` reports progress."""
    image_root, omics_root = site_dir / "images", site_dir / "omics"
    for folder in (image_root, omics_root):
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    truth = SiteTruth()
    ids = dict.fromkeys(ID_TABLES, 1)
    first_person_id = (site_index + 1) * PERSON_ID_STRIDE + 1
    with site_connection(target, site) as conn, (omics_root / "manifest.csv").open("w", encoding="utf-8") as manifest:
        manifest.write("specimen_id,person_id,path\n")
        if target.backend == "postgresql":
            for schema in (target.cdm_schema, target.results_schema):
                conn.execute(sa.text(f"DROP SCHEMA IF EXISTS {quote_identifier(schema)} CASCADE"))
        create_cdm(conn, target.cdm_schema, primary_keys=False)
        create_results(conn, target.results_schema)
        static = {**vocab.vocabulary_frames(), **health_system(site)}
        static_rows = {table: len(frame) for table, frame in static.items()}
        for table, frame in static.items():
            bulk_insert(conn, target.cdm_schema, table, frame)
        for chunk_index, start in enumerate(range(0, persons, chunk_size)):
            n = min(chunk_size, persons - start)
            chunk = build_chunk(site=site, site_index=site_index, profile=profile, seed=seed,
                                chunk_index=chunk_index, n=n, first_person_id=first_person_id + start, ids=ids,
                                image_share=image_share, omics_share=omics_share)
            for table, frame in chunk.tables.items():
                bulk_insert(conn, target.cdm_schema, table, frame)
            for job in chunk.images:
                write_dicom(image_root, job)
            write_omics(omics_root, manifest, chunk.omics)
            truth.add(chunk.truth)
            del chunk
            advance(n)
        add_primary_keys(conn, target.cdm_schema)
    return truth.summary(site=site, profile=profile.label, backend=target.backend, cdm_schema=target.cdm_schema,
                         results_schema=target.results_schema, seed=seed, static_rows=static_rows)
