"""Every row and file of one chunk of persons of one synthetic site, generated in a fixed order.

Part of the synthetic generator (:mod:`omopfl.synth`).  A chunk draws from its own generator, seeded by
``(seed, site index, chunk index)``; the tables below draw from it one after the other, so the same
seed and arguments give identical rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

import omopfl.synth.clinical as clinical
from omopfl.synth.images import ImageJob, image_rows
from omopfl.synth.labs import LabRows
from omopfl.synth.omics import OmicsFile, specimens
from omopfl.synth.people import draw_people
from omopfl.synth.profiles import SiteProfile
from omopfl.synth.rows import ChunkContext

__all__ = ["Chunk", "build_chunk"]


@dataclass
class Chunk:
    """One chunk's tables (in insertion order), files to write and truth counts (see :class:`SiteTruth`)."""

    tables: dict[str, pd.DataFrame]
    images: list[ImageJob]
    omics: list[OmicsFile]
    truth: dict[str, Any]


def build_chunk(*, site: str, site_index: int, profile: SiteProfile, seed: int, chunk_index: int, n: int,
                first_person_id: int, ids: dict[str, int], image_share: float, omics_share: float) -> Chunk:
    """Generate the rows of ``n`` persons from ``first_person_id`` on; ``ids`` (next row id per table) is updated.

    ``image_share`` and ``omics_share`` are the shares of target persons with a linked image or profile.
    """
    rng = np.random.default_rng([seed, site_index, chunk_index])
    people = draw_people(rng, profile, n, first_person_id, image_share, omics_share)
    ctx = ChunkContext(rng, profile, people, first_person_id, ids)
    male, target, outcome = people.male, people.target, people.outcome

    tables: dict[str, pd.DataFrame] = {}
    tables["person"] = clinical.persons(ctx)
    tables["observation_period"] = clinical.observation_periods(ctx)
    visits = clinical.visits(ctx, tables["person"]["care_site_id"].to_numpy())
    tables["visit_occurrence"] = visits.frame
    tables["condition_occurrence"] = clinical.conditions(ctx, visits.index_visit_id, visits.cases, visits.hf_day,
                                                         visits.hf_visit_id)
    tables["drug_exposure"] = clinical.drugs(ctx)
    procedures, image_procedure_ids, image_day = clinical.procedures(ctx, visits.cases, visits.hf_day,
                                                                     visits.hf_visit_id)
    tables["procedure_occurrence"] = procedures
    labs = LabRows(ctx)
    tables["measurement"] = labs.measurements()
    tables["observation"] = clinical.observations(ctx)
    tables["death"] = clinical.deaths(ctx)
    tables["specimen"], omics_files = specimens(ctx)
    tables["image_occurrence"], image_jobs = image_rows(ctx, site, seed, image_procedure_ids, image_day)
    clinical.add_domain_rows(ctx, tables, stream=(seed, site_index, chunk_index))

    truth = {
        "persons": n,
        "male": int(male.sum()),
        "female": int(n - male.sum()),
        "t2dm": int(people.t2dm.sum()),
        "target": int(target.sum()),
        "outcome": int((target & outcome).sum()),
        "scores": (people.probability[target], outcome[target]),
        "glucose": labs.glucose_moments(),
        "dirty": ctx.dirty,
        "null_values": labs.null_values,
        "units": labs.units_seen,
        "images": len(image_jobs),
        "omics": len(omics_files),
        "rows": {table: len(frame) for table, frame in tables.items()},
    }
    return Chunk(tables, image_jobs, omics_files, truth)
