"""Expression profiles of synthetic persons: the ``specimen`` rows and the ``gene,value`` files they name.

Part of the synthetic generator (:mod:`omopfl.synth`).  A few genes carry the latent omics signal
(:data:`OMICS_SIGNAL`); each file is ``<omics_root>/S<specimen_id>.csv`` and ``manifest.csv`` maps
specimens to persons and files.
"""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

import numpy as np
import pandas as pd

from omopfl.synth.concepts import BLOOD_SPECIMEN, EHR
from omopfl.synth.rows import ChunkContext

__all__ = ["OMICS_GENES", "OMICS_SIGNAL", "OmicsFile", "specimens", "write_omics"]

# Expression profiles: real HGNC symbols; a few carry the latent omics signal.
OMICS_GENES: tuple[str, ...] = (
    "NPPA", "NPPB", "MYH6", "MYH7", "TNNT2", "ACTC1", "ATP2A2", "PLN", "RYR2", "SCN5A",
    "KCNH2", "GATA4", "TBX5", "NKX2-5", "MEF2C", "HAND2", "COL1A1", "COL3A1", "POSTN", "TGFB1",
    "IL6", "TNF", "CRP", "CCL2", "NFKB1", "INS", "GCG", "SLC2A4", "PPARG", "ADIPOQ",
    "LEP", "TCF7L2", "KCNJ11", "IRS1", "AKT2", "GCK", "HNF1A", "HNF4A", "APOB", "APOE",
    "LDLR", "PCSK9", "HMGCR", "ACE", "AGT", "REN", "NOS3", "EDN1", "VEGFA", "GAPDH", "ACTB",
)
#: gene -> weight of the latent omics signal in its log2 expression
OMICS_SIGNAL: dict[str, float] = {"NPPB": 0.9, "NPPA": 0.7, "POSTN": 0.5, "MYH7": 0.4, "ATP2A2": -0.5}
_OMICS_BASE = np.round(np.random.default_rng(20240607).normal(8.0, 2.0, len(OMICS_GENES)), 3)
_OMICS_WEIGHTS = np.array([OMICS_SIGNAL.get(g, 0.0) for g in OMICS_GENES])

#: One expression file to write: specimen_id, person_id, file name, log2 expression per gene of OMICS_GENES.
OmicsFile = tuple[int, int, str, np.ndarray]


def specimens(ctx: ChunkContext) -> tuple[pd.DataFrame, list[OmicsFile]]:
    """The ``specimen`` rows of the persons with a linked profile, and their expression files."""
    rng, pp = ctx.rng, ctx.people
    pid, index, u_omics = pp.pid, pp.index, pp.u_omics
    s = np.flatnonzero(pp.linked_omics)
    first = ctx.next_ids("specimen", len(s))
    specimen_id = first + np.arange(len(s))
    names = [f"S{sid:09d}.csv" for sid in specimen_id]
    day = index[s] - rng.integers(1, 61, len(s))
    frame = pd.DataFrame({
        "specimen_id": specimen_id,
        "person_id": pid[s],
        "specimen_concept_id": BLOOD_SPECIMEN,
        "specimen_type_concept_id": EHR,
        "specimen_date": day.astype("datetime64[D]"),
        "specimen_source_id": np.array(names, dtype=object),
        "specimen_source_value": "whole blood RNA",
    })
    expression = (_OMICS_BASE[None, :] + rng.normal(0.0, 0.4, (len(s), len(OMICS_GENES)))
                  + _OMICS_WEIGHTS[None, :] * u_omics[s][:, None])
    jobs = [(int(specimen_id[j]), int(pid[s[j]]), names[j], expression[j]) for j in range(len(s))]
    return frame, jobs


def write_omics(root: Path, manifest: TextIO, jobs: list[OmicsFile]) -> None:
    """Write each expression file under ``root`` and its ``specimen_id,person_id,path`` manifest row."""
    for specimen_id, person_id, name, expression in jobs:
        lines = ["gene,value", *(f"{g},{v:.4f}" for g, v in zip(OMICS_GENES, expression, strict=True))]
        (root / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
        manifest.write(f"{specimen_id},{person_id},{name}\n")
