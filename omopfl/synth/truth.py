"""What a correct pipeline must find in a synthetic site: counts and aggregates, never rows.

Part of the synthetic generator (:mod:`omopfl.synth`).  Each chunk reports its counts; :class:`SiteTruth`
adds them up and :meth:`SiteTruth.summary` makes the :class:`SiteSummary` written to ``truth.json``.
The glucose moments are merged here, independently of :mod:`omopfl.moments` (the code under test).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from omopfl import vocab

__all__ = ["DEFINITIONS", "GENERATOR_VERSION", "SiteSummary", "SiteTruth", "bayes_auc"]

GENERATOR_VERSION = "1"


def bayes_auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` against binary ``labels`` (ties count half).

    Returns None when ``labels`` holds only one class.
    """
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels, dtype=bool)
    n1 = int(labels.sum())
    n0 = len(labels) - n1
    if n1 == 0 or n0 == 0:
        return None
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0
    ranks = average_rank[inverse]
    return float((ranks[labels].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


@dataclass
class SiteSummary:
    """Ground truth of one synthetic site: counts and aggregates only, never rows.

    ``scores`` holds the true outcome probability and the drawn outcome of each target
    person, for pooled checks in memory; it is never written to ``truth.json``.
    """

    site: str
    profile: str
    backend: str
    cdm_schema: str
    results_schema: str
    seed: int
    persons: int
    persons_by_sex: dict[str, int]
    t2dm_persons: int
    target_persons: int
    outcome_persons: int
    outcome_rate: float | None
    bayes_auc: float | None
    units: dict[str, list[str]]
    unit_concept_ids: dict[str, list[int]]
    null_values: dict[str, int]
    dirty_rows: dict[str, dict[str, int]]
    linked_images: int
    linked_omics_files: int
    glucose_last_pre_index: dict[str, Any]
    rows: dict[str, int]
    definitions: dict[str, str]
    generator_version: str = GENERATOR_VERSION
    adapter: Path | None = None
    scores: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the summary (without ``scores``)."""
        data = asdict(self)
        data.pop("scores")
        data["adapter"] = str(self.adapter) if self.adapter is not None else None
        return data

    def truth_dict(self) -> dict[str, Any]:
        """What ``truth.json`` holds: :meth:`to_dict` without file locations."""
        data = self.to_dict()
        data.pop("adapter")
        return data


DEFINITIONS = {
    "t2dm_persons": "persons with at least one condition_occurrence of 201826 or a descendant",
    "target_persons": (
        "persons whose first condition_occurrence of 201826 or a descendant (index) lies in an observation "
        "period with observation_period_start_date + 365 <= index"
    ),
    "outcome_persons": "target persons with a condition_occurrence of 316139 or a descendant on index+1 .. index+365",
    "bayes_auc": "AUC of the true outcome probability against the drawn outcome over the target persons",
    "glucose_last_pre_index": (
        "per target person, the latest measurement of 3004501 on index-365 .. index-1 with a non-NULL "
        "value_as_number, converted to mg/dL (mmol/L x 18.016); mean and sample std (ddof=1) over persons"
    ),
    "dirty_rows": (
        "outside_observation_period: rows dated outside the person's observation period (concepts 444070, "
        "1545959, 3025315); unmapped_concept: rows with concept id 0 (source values LOCAL-*/POC-GLU)"
    ),
}


class Moments:
    """Streaming (n, mean, M2), merged with Chan et al."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def merge(self, n: int, mean: float, m2: float) -> None:
        if n == 0:
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.n * n / total
        self.n = total

    def as_dict(self) -> dict[str, Any]:
        std = math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else None
        return {"n": self.n, "mean_mg_dl": self.mean if self.n else None, "std_mg_dl": std, "unit": "mg/dL"}


@dataclass
class SiteTruth:
    """The sums of the chunks' truth of one site."""

    persons: int = 0
    male: int = 0
    female: int = 0
    t2dm: int = 0
    target: int = 0
    outcome: int = 0
    images: int = 0
    omics: int = 0
    glucose: Moments = field(default_factory=Moments)
    dirty: dict[str, dict[str, int]] = field(default_factory=lambda: {"outside_observation_period": {},
                                                                      "unmapped_concept": {}})
    null_values: dict[str, int] = field(default_factory=lambda: dict.fromkeys(vocab.LABS, 0))
    units: dict[str, set[int]] = field(default_factory=lambda: {k: set() for k in vocab.LABS})
    rows: dict[str, int] = field(default_factory=dict)
    scores: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    def add(self, chunk: dict[str, Any]) -> None:
        for key in ("persons", "male", "female", "t2dm", "target", "outcome", "images", "omics"):
            setattr(self, key, getattr(self, key) + chunk[key])
        self.glucose.merge(*chunk["glucose"])
        for kind, tables in chunk["dirty"].items():
            for table, count in tables.items():
                self.dirty[kind][table] = self.dirty[kind].get(table, 0) + count
        for key, count in chunk["null_values"].items():
            self.null_values[key] += count
        for key, units in chunk["units"].items():
            self.units[key] |= units
        for table, count in chunk["rows"].items():
            self.rows[table] = self.rows.get(table, 0) + count
        probability, outcome = chunk["scores"]
        self.scores.append((probability.astype(np.float64), outcome.astype(bool)))

    def summary(self, *, site: str, profile: str, backend: str, cdm_schema: str, results_schema: str, seed: int,
                static_rows: dict[str, int]) -> SiteSummary:
        """The site's :class:`SiteSummary`; ``static_rows`` counts the rows of the tables written once per site."""
        truth = self
        probability = np.concatenate([s[0] for s in truth.scores]) if truth.scores else np.empty(0)
        outcome = np.concatenate([s[1] for s in truth.scores]) if truth.scores else np.empty(0, dtype=bool)
        rows = {table: truth.rows.get(table, 0) for table in truth.rows}
        rows.update(static_rows)
        glucose = truth.glucose.as_dict()
        glucose["definition"] = DEFINITIONS["glucose_last_pre_index"]
        return SiteSummary(
            site=site,
            profile=profile,
            backend=backend,
            cdm_schema=cdm_schema,
            results_schema=results_schema,
            seed=seed,
            persons=truth.persons,
            persons_by_sex={"male": truth.male, "female": truth.female},
            t2dm_persons=truth.t2dm,
            target_persons=truth.target,
            outcome_persons=truth.outcome,
            outcome_rate=truth.outcome / truth.target if truth.target else None,
            bayes_auc=bayes_auc(probability, outcome),
            units={k: sorted(vocab.UNITS[u] for u in v) for k, v in truth.units.items()},
            unit_concept_ids={k: sorted(v) for k, v in truth.units.items()},
            null_values=dict(truth.null_values),
            dirty_rows={kind: dict(sorted(tables.items())) for kind, tables in truth.dirty.items()},
            linked_images=truth.images,
            linked_omics_files=truth.omics,
            glucose_last_pre_index=glucose,
            rows=dict(sorted(rows.items())),
            definitions=DEFINITIONS,
            scores=(probability, outcome),
        )
