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
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd
import sqlalchemy as sa

from omopfl import vocab
from omopfl.cdm import CDM_TABLES, bulk_insert, create_cdm, create_results, table_columns
from omopfl.db import describe_driver_error, make_engine, quote_identifier
from omopfl.errors import ConfigError, DatabaseError

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
MAX_SITES = 100
PERSON_ID_STRIDE = 10_000_000  # site k's person ids are (k + 1) * stride + 1 ...
DEFAULT_URL_ENV = "OMOPFL_SYNTH_PG_URL"
# Not "cdm.duckdb": DuckDB names the catalog after the file, and a catalog "cdm" makes the schema
# "cdm" ambiguous ("Ambiguous reference to catalog or schema").
DUCKDB_FILE = "omop.duckdb"
GENERATOR_VERSION = "1"
_ENV_NAME_RE = re.compile(r"^[A-Z_][A-Z0-9_]*$")

_EPOCH = np.datetime64("1970-01-01", "D")


def _day(text: str) -> int:
    return int((np.datetime64(text, "D") - _EPOCH).astype(np.int64))


OBS_START_FIRST = _day("2010-01-01")
OBS_START_LAST = _day("2019-12-31")
DATA_END = _day("2024-12-31")
REFERENCE_DAY = _day("2015-07-01")  # ages of the site profiles are ages on this day
PRIOR_OBSERVATION_DAYS = 365
OUTCOME_WINDOW = (1, 365)
LAB_WINDOW_DAYS = 365

# Concepts the generator writes.
EHR, LAB_TYPE, PRESCRIPTION = 32817, 32856, 32838
MALE, FEMALE = 8507, 8532
T2DM_CODES = np.array([201826, 443732, 45757363, 376065, 443729])
T2DM_CODE_P = np.array([0.7, 0.12, 0.06, 0.06, 0.06])
HF_CODES = np.array([316139, 319835, 443580, 439846])
HF_CODE_P = np.array([0.4, 0.4, 0.1, 0.1])
HYPERTENSION, HYPERLIPIDEMIA, OBESITY, CKD, CKD5 = 320128, 432867, 433736, 46271022, 443611
AMI, T1DM, DIABETES_UNSPECIFIED, TACHYCARDIA = 312327, 201254, 201820, 444070
METFORMIN = (40163924, 1503297)  # (clinical drug, ingredient)
LISINOPRIL = (2000000001, 1308216)
ATORVASTATIN = (1545959, 1545958)
INSULIN_GLARGINE = (2000000002, 1502905)
MRI, ECG, CHEST_XRAY = 4013636, 4163951, 4163872
BLOOD_SPECIMEN = 4001225
SMOKER = 903654

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
IMAGE_SIZE = 64

_CODE = {c.concept_id: c.code for c in vocab.CONCEPTS}


@dataclass(frozen=True)
class SiteProfile:
    """How one synthetic site differs from the others."""

    label: str
    mean_age: float
    sd_age: float
    male_share: float
    t2dm_prevalence: float
    race_p: tuple[float, float, float]  # White, Black or African American, Asian
    hispanic_share: float
    glucose_units: tuple[tuple[int, float], ...]  # (unit concept id, share of rows)
    hba1c_unit: int
    creatinine_unit: int
    ldl_unit: int
    lab_missing: float  # chance a diabetic person has no pre-index value of a given lab
    null_value_share: float  # chance a lab row has NULL value_as_number
    outside_observation_share: float  # persons with one planted row outside their observation period
    unmapped_share: float  # persons with one planted row whose concept id is 0
    drug_ingredient_share: float  # drug rows coded at ingredient instead of clinical-drug level
    visit_rate: float  # mean number of background visits per person
    outcome_shift: float  # site effect on the outcome log-odds
    outcome_prevalence: float | None = None  # label skew: the outcome share among diabetics, if fixed


#: Profiles of sites a, b, c, d, e (further sites reuse them in turn).
PROFILES: tuple[SiteProfile, ...] = (
    SiteProfile("academic centre, older, US units", 60, 14, 0.48, 0.16, (0.70, 0.20, 0.10), 0.08,
                ((8840, 1.0),), 8554, 8840, 8840, 0.10, 0.02, 0.010, 0.010, 0.0, 3.0, 0.0),
    SiteProfile("European hospital, SI units", 55, 15, 0.52, 0.11, (0.88, 0.04, 0.08), 0.02,
                ((8753, 1.0),), 9579, 8749, 8753, 0.20, 0.04, 0.020, 0.015, 0.3, 2.5, 0.2),
    SiteProfile("community hospital, mixed glucose units", 50, 17, 0.45, 0.13, (0.55, 0.35, 0.10), 0.20,
                ((8840, 0.6), (8753, 0.4)), 8554, 8749, 8840, 0.30, 0.05, 0.030, 0.020, 0.1, 2.0, -0.2),
    SiteProfile("diabetes clinic, IFCC HbA1c", 62, 12, 0.55, 0.22, (0.60, 0.25, 0.15), 0.10,
                ((8840, 1.0),), 9579, 8840, 8840, 0.05, 0.01, 0.005, 0.005, 0.0, 3.5, 0.1),
    SiteProfile("regional hospital, SI glucose", 57, 16, 0.50, 0.12, (0.80, 0.10, 0.10), 0.05,
                ((8753, 1.0),), 8554, 8749, 8753, 0.15, 0.03, 0.015, 0.010, 0.2, 2.5, -0.1),
)
DEFAULT_SIZES: tuple[int, ...] = (2000, 1200, 800, 600, 500)
DEFAULT_SIZE_BEYOND = 400

_LAB_NOISE = {"hba1c": 0.15, "glucose": 8.0, "creatinine": 0.05, "ldl": 6.0, "bmi": 0.3, "weight": 1.0,
              "height": 0.5, "sbp": 7.0}


# ----------------------------------------------------------------------------------------------
# Public helpers
# ----------------------------------------------------------------------------------------------


def _calibrate(log_odds: np.ndarray, prevalence: float) -> float:
    """The shift ``c`` with ``mean(sigmoid(log_odds + c)) == prevalence`` (bisection; no random draw)."""
    low, high = -40.0, 40.0
    for _ in range(80):
        mid = (low + high) / 2
        if float(np.mean(_sigmoid(log_odds + mid))) < prevalence:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def label_skew_profiles(n_sites: int, skew: float) -> list[SiteProfile]:
    """Site profiles with a label skew: even-numbered sites (a, c, ...) have the outcome in ``1 - skew``
    of their diabetics, odd-numbered ones (b, d, ...) in ``skew`` (0.95: a 95/5 split)."""
    if isinstance(skew, bool) or not isinstance(skew, int | float) or not 0.5 < float(skew) < 1.0:
        raise ConfigError("label_skew must be a share strictly between 0.5 and 1 (e.g. 0.95 for 95/5)")
    return [replace(PROFILES[k % len(PROFILES)],
                    outcome_prevalence=float(skew) if k % 2 else 1.0 - float(skew))
            for k in range(n_sites)]


def _letters(k: int) -> str:
    """``a`` .. ``z``, then ``aa``, ``ab`` ... (spreadsheet columns): sorted by length, then name."""
    out = ""
    k += 1
    while k:
        k, rest = divmod(k - 1, 26)
        out = chr(ord("a") + rest) + out
    return out


def site_names(n_sites: int) -> list[str]:
    """``site_a`` .. ``site_z``, ``site_aa``, ``site_ab`` ... for ``n_sites`` sites (1 to 100)."""
    if isinstance(n_sites, bool) or not isinstance(n_sites, int) or not 1 <= n_sites <= MAX_SITES:
        raise ConfigError(f"n_sites must be an integer from 1 to {MAX_SITES}")
    return [f"site_{_letters(k)}" for k in range(n_sites)]


def _default_size(k: int) -> int:
    return DEFAULT_SIZES[k] if k < len(DEFAULT_SIZES) else DEFAULT_SIZE_BEYOND


def split_persons(persons: int | Sequence[int] | None, n_sites: int) -> list[int]:
    """Persons per site.

    ``None`` gives the default spread (2000, 1200, 800, 600, 500, then 400 per site);
    an ``int`` is a *total* split across the sites in proportion to that spread
    (largest remainder, at least one person per site); a sequence gives each site's
    size explicitly and must have one entry per site.
    """
    site_names(n_sites)
    if persons is None:
        sizes = [_default_size(k) for k in range(n_sites)]
    elif isinstance(persons, bool):
        raise ConfigError("persons must be an integer total or one integer per site")
    elif isinstance(persons, int | np.integer):
        total = int(persons)
        if total < n_sites:
            raise ConfigError(f"persons ({total}) must be at least the number of sites ({n_sites})")
        weights = np.array([_default_size(k) for k in range(n_sites)], dtype=float)
        spare = total - n_sites
        exact = weights / weights.sum() * spare
        sizes_arr = np.floor(exact).astype(int)
        remainder = spare - int(sizes_arr.sum())
        for k in np.argsort(-(exact - sizes_arr), kind="stable")[:remainder]:
            sizes_arr[k] += 1
        sizes = [int(s) + 1 for s in sizes_arr]
    else:
        sizes = list(persons)
        if len(sizes) != n_sites:
            raise ConfigError(f"persons lists {len(sizes)} site sizes for {n_sites} sites")
        if any(isinstance(s, bool) or not isinstance(s, int | np.integer) or s < 1 for s in sizes):
            raise ConfigError("every site size in persons must be a positive integer")
        sizes = [int(s) for s in sizes]
    if max(sizes) >= PERSON_ID_STRIDE:
        raise ConfigError(f"at most {PERSON_ID_STRIDE - 1} persons per site")
    return sizes


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


# ----------------------------------------------------------------------------------------------
# Row blocks
# ----------------------------------------------------------------------------------------------


def _column(value: Any, n: int) -> np.ndarray:
    if isinstance(value, np.ndarray):
        if len(value) != n:
            raise ValueError("column length differs from the block's person count")
        return value
    if value is None or isinstance(value, str):
        return np.full(n, value, dtype=object)
    return np.full(n, value)


class _Rows:
    """Blocks of rows of one table, concatenated, sorted by person and date, then numbered."""

    def __init__(self) -> None:
        self._blocks: list[dict[str, np.ndarray]] = []
        self.size = 0

    def add(self, person: np.ndarray, **columns: Any) -> int:
        """Add a block (``person`` holds chunk-local person indexes); return its first row position."""
        n = len(person)
        block = {"person": np.asarray(person, dtype=np.int64)}
        block.update({name: _column(value, n) for name, value in columns.items()})
        start = self.size
        self._blocks.append(block)
        self.size += n
        return start

    def build(self, id_column: str | None, first_id: int, first_person_id: int, date_column: str,
              date_columns: Sequence[str]) -> tuple[pd.DataFrame, np.ndarray]:
        """Return the frame and, for each added row position, its position in the frame."""
        names = list(dict.fromkeys(name for block in self._blocks for name in block))
        columns: dict[str, np.ndarray] = {}
        for name in names:
            kind = next(block[name].dtype.kind for block in self._blocks if name in block)
            parts = []
            for block in self._blocks:
                if name in block:
                    parts.append(block[name])
                elif kind == "O":
                    parts.append(np.full(len(block["person"]), None, dtype=object))
                else:
                    parts.append(np.full(len(block["person"]), np.nan))
            columns[name] = np.concatenate(parts) if parts else np.empty(0)
        if not columns:
            return pd.DataFrame(), np.empty(0, dtype=np.int64)
        order = np.lexsort((columns[date_column], columns["person"]))
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        data: dict[str, Any] = {}
        if id_column is not None:
            data[id_column] = first_id + np.arange(len(order), dtype=np.int64)
        data["person_id"] = columns.pop("person")[order] + first_person_id
        for name, values in columns.items():
            values = values[order]
            if name in date_columns:
                values = values.astype(np.int64).astype("datetime64[D]")
            data[name] = values
        return pd.DataFrame(data), rank


def _codes(concepts: np.ndarray) -> np.ndarray:
    """Source values (vocabulary codes) of concept ids."""
    return pd.Series(concepts).map(_CODE).to_numpy(dtype=object)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


# ----------------------------------------------------------------------------------------------
# One chunk of persons
# ----------------------------------------------------------------------------------------------


@dataclass
class _ImageJob:
    person_id: int
    birth_day: int
    male: bool
    study_day: int
    path: str
    study_uid: str
    series_uid: str
    sop_uid: str
    frame_uid: str
    pixels: np.ndarray


@dataclass
class _Chunk:
    tables: dict[str, pd.DataFrame]
    images: list[_ImageJob]
    omics: list[tuple[int, int, str, np.ndarray]]  # specimen_id, person_id, file name, expression
    truth: dict[str, Any]


@dataclass
class _People:
    """Per-person arrays of one chunk (position i is the chunk's i-th person); days count from 1970-01-01."""

    pid: np.ndarray
    male: np.ndarray
    birth: np.ndarray
    race: np.ndarray
    hispanic: np.ndarray
    obs_start: np.ndarray
    obs_end: np.ndarray
    t2dm: np.ndarray
    t1dm: np.ndarray
    index: np.ndarray  # index date (first type 2 diabetes record); meaningful for diabetic persons only
    target: np.ndarray
    age_index: np.ndarray
    bmi: np.ndarray
    htn: np.ndarray
    htn_day: np.ndarray
    ckd: np.ndarray
    ckd_day: np.ndarray
    hyperlipidemia: np.ndarray
    hl_day: np.ndarray
    metformin: np.ndarray
    smoker: np.ndarray
    probability: np.ndarray
    outcome: np.ndarray
    u_image: np.ndarray
    u_omics: np.ndarray
    linked_image: np.ndarray
    linked_omics: np.ndarray
    latent: dict[str, np.ndarray]


class _ChunkBuilder:
    """Generates every row of one chunk of persons of one site."""

    people: _People

    def __init__(self, *, site: str, site_index: int, profile: SiteProfile, seed: int, chunk_index: int,
                 n: int, first_person_id: int, ids: dict[str, int], image_share: float,
                 omics_share: float) -> None:
        self.site = site
        self.profile = profile
        self.seed = seed
        self.rng = np.random.default_rng([seed, site_index, chunk_index])
        self.site_key, self.chunk_key = site_index, chunk_index
        self.n = n
        self.first_person_id = first_person_id
        self.ids = ids
        self.image_share = image_share
        self.omics_share = omics_share
        self.dirty: dict[str, dict[str, int]] = {"outside_observation_period": {}, "unmapped_concept": {}}
        self.null_values: dict[str, int] = {key: 0 for key in vocab.LABS}
        self.units_seen: dict[str, set[int]] = {key: set() for key in vocab.LABS}
        self.glucose_rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    # -- helpers --------------------------------------------------------------------------------
    def _uniform(self, low: np.ndarray, high: np.ndarray) -> np.ndarray:
        """Uniform integer days in [low, high] (arrays)."""
        return low + np.floor(self.rng.random(len(low)) * (high - low + 1)).astype(np.int64)

    def _count(self, kind: str, table: str, n: int) -> None:
        self.dirty[kind][table] = self.dirty[kind].get(table, 0) + int(n)

    def _next_ids(self, table: str, n: int) -> int:
        first = self.ids[table]
        self.ids[table] = first + n
        return first

    # -- the chunk ------------------------------------------------------------------------------
    def _draw_people(self) -> _People:
        """The latent clinical story of each person: who has diabetes, when, and how likely the outcome is."""
        rng, p, n = self.rng, self.profile, self.n
        pid = self.first_person_id + np.arange(n)

        # Demographics and observation.
        male = rng.random(n) < p.male_share
        age_ref = np.clip(rng.normal(p.mean_age, p.sd_age, n), 18.0, 90.0)
        birth = REFERENCE_DAY - np.round(age_ref * 365.25).astype(np.int64) - rng.integers(0, 365, n)
        race = rng.choice(np.array([8527, 8516, 8515]), size=n, p=np.array(p.race_p))
        hispanic = rng.random(n) < p.hispanic_share
        obs_start = rng.integers(OBS_START_FIRST, OBS_START_LAST + 1, n)
        obs_end = np.minimum(DATA_END, obs_start + 730 + rng.gamma(2.0, 900.0, n).astype(np.int64))
        span = obs_end - obs_start  # >= 730 days

        # Latent clinical state.
        height = rng.normal(np.where(male, 176.0, 163.0), 7.0)
        bmi = np.clip(rng.normal(27.0, 4.8, n), 16.0, 60.0)
        t2dm = rng.random(n) < _sigmoid(_logit(p.t2dm_prevalence) + 0.035 * (age_ref - 55) + 0.09 * (bmi - 27))
        t1dm = ~t2dm & (rng.random(n) < 0.006)
        index_offset = rng.integers(30, span - PRIOR_OBSERVATION_DAYS + 1)
        index = obs_start + index_offset  # used for diabetic persons only
        target = t2dm & (index_offset >= PRIOR_OBSERVATION_DAYS)
        age_index = (index - birth) / 365.25
        hba1c = np.where(t2dm, np.clip(rng.normal(7.6, 1.3, n), 5.8, 14.0), np.clip(rng.normal(5.4, 0.35, n), 4.2, 6.4))
        glucose = np.clip(28.7 * hba1c - 46.7 + rng.normal(0.0, 18.0, n), 55.0, 600.0)
        ckd = rng.random(n) < _sigmoid(-3.0 + 0.05 * (age_index - 55) + 0.9 * t2dm)
        creatinine = np.exp(rng.normal(np.log(np.where(male, 0.95, 0.78)), 0.2)) * np.where(ckd, 1.9, 1.0)
        htn = rng.random(n) < _sigmoid(-0.9 + 0.05 * (age_index - 55) + 0.6 * t2dm + 0.06 * (bmi - 27))
        hyperlipidemia = rng.random(n) < _sigmoid(-1.4 + 0.03 * (age_index - 55) + 0.7 * t2dm)
        ldl = np.clip(rng.normal(118.0 + 18.0 * hyperlipidemia, 28.0), 40.0, 300.0)
        sbp = np.clip(rng.normal(121.0 + 16.0 * htn + 0.35 * (age_index - 50), 11.0), 85.0, 230.0)
        weight = bmi * (height / 100.0) ** 2
        metformin = t2dm & (rng.random(n) < 0.65)
        smoker = rng.random(n) < 0.18
        u_image = rng.standard_normal(n)
        u_omics = rng.standard_normal(n)
        log_odds = (
            -2.6 + p.outcome_shift + 0.55 * (age_index - 62) / 11 + 0.3 * male + 0.5 * (hba1c - 7.6) / 1.3
            + 0.35 * (bmi - 30) / 5 + 0.5 * htn + 0.45 * np.clip((creatinine - 0.95) / 0.3, -3, 4)
            - 0.35 * metformin + 0.9 * u_image + 0.7 * u_omics
        )
        if p.outcome_prevalence is not None and t2dm.any():
            log_odds = log_odds + _calibrate(log_odds[t2dm], p.outcome_prevalence)
        probability = _sigmoid(log_odds)
        outcome = t2dm & (rng.random(n) < probability)
        image_draw = rng.random(n)
        omics_draw = rng.random(n)
        linked_image = target & (image_draw < self.image_share)
        linked_omics = target & (omics_draw < self.omics_share)
        latent = {"hba1c": hba1c, "glucose": glucose, "creatinine": creatinine, "ldl": ldl, "bmi": bmi,
                  "weight": weight, "height": height, "sbp": sbp}

        # Days of diagnoses that precede the index date of diabetic persons.
        pre_index_or_any = np.where(t2dm, index_offset, span + 1)
        htn_day = obs_start + np.floor(rng.random(n) * pre_index_or_any).astype(np.int64)
        ckd_day = obs_start + np.floor(rng.random(n) * pre_index_or_any).astype(np.int64)
        hl_day = self._uniform(obs_start, obs_end)
        return _People(pid, male, birth, race, hispanic, obs_start, obs_end, t2dm, t1dm, index, target, age_index,
                       bmi, htn, htn_day, ckd, ckd_day, hyperlipidemia, hl_day, metformin, smoker, probability, outcome,
                       u_image, u_omics, linked_image, linked_omics, latent)

    def build(self) -> _Chunk:
        rng, p, n = self.rng, self.profile, self.n
        people = self.people = self._draw_people()
        idx = np.arange(n)
        pid, male, birth, obs_start, obs_end = people.pid, people.male, people.birth, people.obs_start, people.obs_end
        t2dm, target, index, outcome = people.t2dm, people.target, people.index, people.outcome
        race, hispanic = people.race, people.hispanic

        tables: dict[str, pd.DataFrame] = {}
        tables["person"] = pd.DataFrame({
            "person_id": pid,
            "gender_concept_id": np.where(male, MALE, FEMALE),
            "year_of_birth": birth.astype("datetime64[D]").astype("datetime64[Y]").astype(np.int64) + 1970,
            "month_of_birth": birth.astype("datetime64[D]").astype("datetime64[M]").astype(np.int64) % 12 + 1,
            "day_of_birth": (birth.astype("datetime64[D]") - birth.astype("datetime64[D]").astype("datetime64[M]"))
            .astype(np.int64) + 1,
            "race_concept_id": race,
            "ethnicity_concept_id": np.where(hispanic, 38003563, 38003564),
            "location_id": rng.integers(1, 4, n),
            "care_site_id": rng.integers(1, 4, n),
            "provider_id": rng.integers(1, 21, n),
            "gender_source_value": np.where(male, "M", "F").astype(object),
            "race_source_value": _codes(race),
        })
        tables["observation_period"] = pd.DataFrame({
            "observation_period_id": self._next_ids("observation_period", n) + idx,
            "person_id": pid,
            "observation_period_start_date": obs_start.astype("datetime64[D]"),
            "observation_period_end_date": obs_end.astype("datetime64[D]"),
            "period_type_concept_id": EHR,
        })

        # Visits: background, one outpatient visit at each diabetic index date, one admission per outcome.
        visits = _Rows()
        n_visits = 1 + rng.poisson(p.visit_rate, n)
        vp = np.repeat(idx, n_visits)
        vstart = self._uniform(obs_start[vp], obs_end[vp])
        vconcept = rng.choice(np.array([9202, 9203, 9201]), size=len(vp), p=np.array([0.85, 0.10, 0.05]))
        vend = np.minimum(vstart + np.where(vconcept == 9201, rng.integers(1, 11, len(vp)), 0), obs_end[vp])
        visits.add(vp, visit_concept_id=vconcept, visit_start_date=vstart, visit_end_date=vend)
        diabetic = np.flatnonzero(t2dm)
        index_visit_at = visits.add(diabetic, visit_concept_id=9202, visit_start_date=index[diabetic],
                                    visit_end_date=index[diabetic])
        cases = np.flatnonzero(outcome)
        hf_day = index[cases] + rng.integers(OUTCOME_WINDOW[0], OUTCOME_WINDOW[1] + 1, len(cases))
        hf_end = np.minimum(hf_day + rng.integers(2, 12, len(cases)), obs_end[cases])
        hf_visit_at = visits.add(cases, visit_concept_id=9201, visit_start_date=hf_day, visit_end_date=hf_end)
        care_site = tables["person"]["care_site_id"].to_numpy()
        visit_frame, visit_rank = visits.build(
            "visit_occurrence_id", self.ids["visit_occurrence"], self.first_person_id, "visit_start_date",
            ("visit_start_date", "visit_end_date"))
        self._next_ids("visit_occurrence", len(visit_frame))
        visit_frame["visit_type_concept_id"] = EHR
        visit_frame["care_site_id"] = care_site[visit_frame["person_id"].to_numpy() - self.first_person_id]
        visit_frame["visit_source_value"] = _codes(visit_frame["visit_concept_id"].to_numpy())
        tables["visit_occurrence"] = visit_frame
        first_visit = int(visit_frame["visit_occurrence_id"].iloc[0]) if len(visit_frame) else 0
        index_visit_id = first_visit + visit_rank[index_visit_at:index_visit_at + len(diabetic)]
        hf_visit_id = first_visit + visit_rank[hf_visit_at:hf_visit_at + len(cases)]

        tables["condition_occurrence"] = self._conditions(index_visit_id, cases, hf_day, hf_visit_id)
        tables["drug_exposure"] = self._drugs()
        procedures, image_procedure_ids, image_day = self._procedures(cases, hf_day, hf_visit_id)
        tables["procedure_occurrence"] = procedures
        tables["measurement"] = self._measurements()
        tables["observation"] = self._observations()
        tables["death"] = self._deaths()
        specimens, omics_jobs = self._specimens()
        tables["specimen"] = specimens
        image_rows, image_jobs = self._images(image_procedure_ids, image_day)
        tables["image_occurrence"] = image_rows
        self._add_domain_rows(tables, site_index_seed=(self.seed, self.site_key, self.chunk_key))

        truth = {
            "persons": n,
            "male": int(male.sum()),
            "female": int(n - male.sum()),
            "t2dm": int(t2dm.sum()),
            "target": int(target.sum()),
            "outcome": int((target & outcome).sum()),
            "scores": (people.probability[target], outcome[target]),
            "glucose": self._glucose_moments(),
            "dirty": self.dirty,
            "null_values": self.null_values,
            "units": self.units_seen,
            "images": len(image_jobs),
            "omics": len(omics_jobs),
            "rows": {table: len(frame) for table, frame in tables.items()},
        }
        return _Chunk(tables, image_jobs, omics_jobs, truth)

    # -- tables ---------------------------------------------------------------------------------
    def _conditions(self, index_visit_id: np.ndarray, cases: np.ndarray, hf_day: np.ndarray,
                    hf_visit_id: np.ndarray) -> pd.DataFrame:
        rng, n, pp = self.rng, self.n, self.people
        obs_start, obs_end, t2dm, t1dm, index = pp.obs_start, pp.obs_end, pp.t2dm, pp.t1dm, pp.index
        outcome = pp.outcome
        age_index, bmi = pp.age_index, pp.bmi
        diabetic = np.flatnonzero(t2dm)
        rows = _Rows()

        def codes(choices: np.ndarray, probs: np.ndarray, size: int) -> np.ndarray:
            return rng.choice(choices, size=size, p=probs)

        # Type 2 diabetes: the first record is the index date; follow-up records come later.
        rows.add(diabetic, condition_concept_id=codes(T2DM_CODES, T2DM_CODE_P, len(diabetic)),
                 condition_start_date=index[diabetic], visit_occurrence_id=index_visit_id)
        repeats = rng.integers(0, 4, len(diabetic))
        fp = np.repeat(diabetic, repeats)
        rows.add(fp, condition_concept_id=codes(T2DM_CODES, T2DM_CODE_P, len(fp)),
                 condition_start_date=self._uniform(index[fp] + 1, obs_end[fp]))
        # Heart failure: outcomes inside the window, distractors outside it, background in non-diabetics.
        rows.add(cases, condition_concept_id=codes(HF_CODES, HF_CODE_P, len(cases)), condition_start_date=hf_day,
                 visit_occurrence_id=hf_visit_id)
        controls = np.flatnonzero(t2dm & ~outcome)
        kind = rng.random(len(controls))
        same_day = controls[kind < 0.03]
        rows.add(same_day, condition_concept_id=codes(HF_CODES, HF_CODE_P, len(same_day)),
                 condition_start_date=index[same_day])
        before = controls[(kind >= 0.03) & (kind < 0.06)]
        rows.add(before, condition_concept_id=codes(HF_CODES, HF_CODE_P, len(before)),
                 condition_start_date=self._uniform(obs_start[before], index[before] - 1))
        late = controls[(kind >= 0.06) & (kind < 0.11)]
        late = late[obs_end[late] - index[late] > OUTCOME_WINDOW[1]]
        rows.add(late, condition_concept_id=codes(HF_CODES, HF_CODE_P, len(late)),
                 condition_start_date=self._uniform(index[late] + OUTCOME_WINDOW[1] + 1, obs_end[late]))
        background_hf = np.flatnonzero(~t2dm & (rng.random(n) < _sigmoid(-4.2 + 0.06 * (age_index - 55))))
        rows.add(background_hf, condition_concept_id=codes(HF_CODES, HF_CODE_P, len(background_hf)),
                 condition_start_date=self._uniform(obs_start[background_hf], obs_end[background_hf]))
        # Comorbidities (before the index date of diabetic persons where they enter the outcome model).
        h = np.flatnonzero(pp.htn)
        rows.add(h, condition_concept_id=HYPERTENSION, condition_start_date=pp.htn_day[h])
        c = np.flatnonzero(pp.ckd)
        rows.add(c, condition_concept_id=CKD, condition_start_date=pp.ckd_day[c])
        c5 = c[rng.random(len(c)) < 0.1]
        rows.add(c5, condition_concept_id=CKD5, condition_start_date=np.minimum(pp.ckd_day[c5] + 200, obs_end[c5]))
        hl = np.flatnonzero(pp.hyperlipidemia)
        rows.add(hl, condition_concept_id=HYPERLIPIDEMIA, condition_start_date=pp.hl_day[hl])
        ob = np.flatnonzero((bmi >= 30) & (rng.random(n) < 0.6))
        rows.add(ob, condition_concept_id=OBESITY, condition_start_date=self._uniform(obs_start[ob], obs_end[ob]))
        mi = np.flatnonzero(rng.random(n) < _sigmoid(-4.0 + 0.05 * (age_index - 55) + 0.5 * t2dm))
        rows.add(mi, condition_concept_id=AMI, condition_start_date=self._uniform(obs_start[mi], obs_end[mi]))
        t1 = np.repeat(np.flatnonzero(t1dm), 2)
        rows.add(t1, condition_concept_id=T1DM, condition_start_date=self._uniform(obs_start[t1], obs_end[t1]))
        dm = np.flatnonzero(~t2dm & ~t1dm & (rng.random(n) < 0.01))
        rows.add(dm, condition_concept_id=DIABETES_UNSPECIFIED,
                 condition_start_date=self._uniform(obs_start[dm], obs_end[dm]))
        ta = np.flatnonzero(rng.random(n) < 0.05)
        rows.add(ta, condition_concept_id=TACHYCARDIA, condition_start_date=self._uniform(obs_start[ta], obs_end[ta]))
        # Planted dirt: a row outside the observation period, and unmapped rows (concept id 0).
        outside = self._outside_persons("condition_occurrence")
        rows.add(outside, condition_concept_id=TACHYCARDIA, condition_start_date=self._outside_day(
            outside, obs_start, obs_end))
        unmapped = self._unmapped_persons("condition_occurrence")
        rows.add(unmapped, condition_concept_id=0,
                 condition_start_date=self._uniform(obs_start[unmapped], obs_end[unmapped]),
                 condition_source_value="LOCAL-DX-7731")
        frame, _ = rows.build("condition_occurrence_id", self.ids["condition_occurrence"], self.first_person_id,
                              "condition_start_date", ("condition_start_date",))
        self._next_ids("condition_occurrence", len(frame))
        source = np.array(frame["condition_source_value"], dtype=object)
        missing = pd.isna(source)
        source[missing] = _codes(frame["condition_concept_id"].to_numpy()[missing])
        frame["condition_source_value"] = source
        frame["condition_type_concept_id"] = EHR
        return frame

    def _outside_persons(self, table: str) -> np.ndarray:
        # One third of the persons drawn for an outside-observation row get it in each of three tables.
        draw = self.rng.random(self.n)
        which = {"condition_occurrence": 0, "drug_exposure": 1, "measurement": 2}[table]
        share = self.profile.outside_observation_share / 3.0
        chosen = np.flatnonzero((draw >= which * share) & (draw < (which + 1) * share))
        self._count("outside_observation_period", table, len(chosen))
        return chosen

    def _outside_day(self, persons: np.ndarray, obs_start: np.ndarray, obs_end: np.ndarray) -> np.ndarray:
        before = self.rng.random(len(persons)) < 0.6
        gap_before = self.rng.integers(30, 1500, len(persons))
        gap_after = self.rng.integers(30, 365, len(persons))
        return np.where(before, obs_start[persons] - gap_before, obs_end[persons] + gap_after)

    def _unmapped_persons(self, table: str) -> np.ndarray:
        draw = self.rng.random(self.n)
        which = {"condition_occurrence": 0, "drug_exposure": 1, "measurement": 2}[table]
        share = self.profile.unmapped_share / 3.0
        chosen = np.flatnonzero((draw >= which * share) & (draw < (which + 1) * share))
        self._count("unmapped_concept", table, len(chosen))
        return chosen

    def _drugs(self) -> pd.DataFrame:
        rng, p, n, pp = self.rng, self.profile, self.n, self.people
        obs_start, obs_end, index, htn_day, hl_day = pp.obs_start, pp.obs_end, pp.index, pp.htn_day, pp.hl_day
        rows = _Rows()

        def exposures(persons: np.ndarray, drug: tuple[int, int], start: np.ndarray, max_fills: int,
                      supply: int) -> None:
            fills = rng.integers(1, max_fills + 1, len(persons))
            dp = np.repeat(persons, fills)
            within = np.arange(len(dp)) - np.repeat(np.cumsum(fills) - fills, fills)
            dstart = np.repeat(start, fills) + within * supply
            keep = dstart <= obs_end[dp]
            dp, dstart = dp[keep], dstart[keep]
            ingredient = rng.random(len(dp)) < p.drug_ingredient_share
            rows.add(dp, drug_concept_id=np.where(ingredient, drug[1], drug[0]), drug_exposure_start_date=dstart,
                     drug_exposure_end_date=np.minimum(dstart + supply - 1, obs_end[dp]), days_supply=supply,
                     quantity=float(supply))

        m = np.flatnonzero(pp.metformin)  # starts on or before the index date
        exposures(m, METFORMIN, np.maximum(index[m] - rng.integers(0, 181, len(m)), obs_start[m]), 8, 90)
        g = np.flatnonzero(pp.t2dm & (rng.random(n) < 0.15))  # insulin after the index date
        exposures(g, INSULIN_GLARGINE, index[g] + rng.integers(30, 301, len(g)), 4, 30)
        h = np.flatnonzero(pp.htn & (rng.random(n) < 0.6))
        exposures(h, LISINOPRIL, np.minimum(htn_day[h] + rng.integers(0, 61, len(h)), obs_end[h]), 6, 90)
        a = np.flatnonzero(pp.hyperlipidemia & (rng.random(n) < 0.55))
        exposures(a, ATORVASTATIN, np.minimum(hl_day[a] + rng.integers(0, 91, len(a)), obs_end[a]), 6, 90)
        outside = self._outside_persons("drug_exposure")
        day = self._outside_day(outside, obs_start, obs_end)
        rows.add(outside, drug_concept_id=ATORVASTATIN[0], drug_exposure_start_date=day,
                 drug_exposure_end_date=day + 29, days_supply=30, quantity=30.0)
        unmapped = self._unmapped_persons("drug_exposure")
        day = self._uniform(obs_start[unmapped], obs_end[unmapped])
        rows.add(unmapped, drug_concept_id=0, drug_exposure_start_date=day, drug_exposure_end_date=day + 29,
                 days_supply=30, quantity=30.0, drug_source_value="LOCAL-RX-0042")
        frame, _ = rows.build("drug_exposure_id", self.ids["drug_exposure"], self.first_person_id,
                              "drug_exposure_start_date", ("drug_exposure_start_date", "drug_exposure_end_date"))
        self._next_ids("drug_exposure", len(frame))
        source = np.array(frame["drug_source_value"], dtype=object)
        missing = pd.isna(source)
        source[missing] = _codes(frame["drug_concept_id"].to_numpy()[missing])
        frame["drug_source_value"] = source
        frame["drug_type_concept_id"] = PRESCRIPTION
        return frame

    def _procedures(self, cases: np.ndarray, hf_day: np.ndarray,
                    hf_visit_id: np.ndarray) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
        """Procedures, with the ids and days of the MR procedures behind the linked images."""
        rng, n, pp = self.rng, self.n, self.people
        obs_start, obs_end, index = pp.obs_start, pp.obs_end, pp.index
        rows = _Rows()
        e = np.flatnonzero(rng.random(n) < 0.3)
        rows.add(e, procedure_concept_id=ECG, procedure_date=self._uniform(obs_start[e], obs_end[e]))
        x = np.flatnonzero(rng.random(n) < 0.1)
        rows.add(x, procedure_concept_id=CHEST_XRAY, procedure_date=self._uniform(obs_start[x], obs_end[x]))
        rows.add(cases, procedure_concept_id=ECG, procedure_date=hf_day, visit_occurrence_id=hf_visit_id)
        imaged = np.flatnonzero(pp.linked_image)
        image_day = index[imaged] - rng.integers(1, 91, len(imaged))
        image_at = rows.add(imaged, procedure_concept_id=MRI, procedure_date=image_day)
        frame, rank = rows.build("procedure_occurrence_id", self.ids["procedure_occurrence"], self.first_person_id,
                                 "procedure_date", ("procedure_date",))
        self._next_ids("procedure_occurrence", len(frame))
        frame["procedure_type_concept_id"] = EHR
        frame["procedure_source_value"] = _codes(frame["procedure_concept_id"].to_numpy())
        first = int(frame["procedure_occurrence_id"].iloc[0]) if len(frame) else 0
        image_procedure_ids = first + rank[image_at:image_at + len(imaged)]
        return frame, image_procedure_ids, image_day

    def _lab_rows(self, rows: _Rows, key: str, persons: np.ndarray, days: np.ndarray,
                  canonical: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Add lab rows in the site's units; return (stored value, unit concept id)."""
        rng, p = self.rng, self.profile
        lab = vocab.LABS[key]
        if key == "glucose":
            units = np.array([u for u, _ in p.glucose_units])
            unit = rng.choice(units, size=len(persons), p=np.array([s for _, s in p.glucose_units]))
        else:
            fixed = {"hba1c": p.hba1c_unit, "creatinine": p.creatinine_unit, "ldl": p.ldl_unit}.get(
                key, lab.canonical_unit)
            unit = np.full(len(persons), fixed)
        value = np.empty(len(persons))
        for unit_id in np.unique(unit):
            a, b = lab.conversions[int(unit_id)]
            mask = unit == unit_id
            value[mask] = np.round(a * canonical[mask] + b, lab.decimals[int(unit_id)])
            self.units_seen[key].add(int(unit_id))
        null = rng.random(len(persons)) < p.null_value_share
        value[null] = np.nan
        self.null_values[key] += int(null.sum())
        rows.add(persons, measurement_concept_id=lab.concept_id, measurement_date=days, value_as_number=value,
                 unit_concept_id=unit, measurement_source_value=_CODE[lab.concept_id],
                 unit_source_value=pd.Series(unit).map(vocab.UNITS).to_numpy(dtype=object))
        return value, unit

    def _measurements(self) -> pd.DataFrame:
        rng, p, n, pp = self.rng, self.profile, self.n, self.people
        obs_start, obs_end, t2dm, target, index, latent = (pp.obs_start, pp.obs_end, pp.t2dm, pp.target, pp.index,
                                                           pp.latent)
        rows = _Rows()
        diabetic = np.flatnonzero(t2dm)
        for key in vocab.LABS:
            # Pre-index values of diabetic persons: up to three, in disjoint 121-day bands before the index date.
            has = rng.random(len(diabetic)) >= p.lab_missing
            k = rng.integers(1, 4, len(diabetic)) * has
            mp = np.repeat(diabetic, k)
            band = np.arange(len(mp)) - np.repeat(np.cumsum(k) - k, k)
            offset = 1 + band * 121 + rng.integers(0, 121, len(mp))
            days = np.maximum(index[mp] - offset, obs_start[mp])
            canonical = latent[key][mp] + rng.normal(0.0, _LAB_NOISE[key], len(mp))
            value, unit = self._lab_rows(rows, key, mp, days, canonical)
            if key == "glucose":
                keep = target[mp] & ~np.isnan(value)
                to_mg = np.where(unit[keep] == 8840, value[keep], value[keep] * 18.016)
                self.glucose_rows.append((mp[keep], offset[keep], to_mg))
            # Follow-up HbA1c and glucose after the index date.
            if key in ("hba1c", "glucose"):
                k2 = rng.integers(0, 3, len(diabetic))
                fp = np.repeat(diabetic, k2)
                days = index[fp] + rng.integers(1, LAB_WINDOW_DAYS, len(fp))
                self._lab_rows(rows, key, fp, days, latent[key][fp] + rng.normal(0.0, _LAB_NOISE[key], len(fp)))
            # Background values of non-diabetic persons.
            share = 0.5 if key in ("bmi", "weight", "height", "sbp") else 0.3
            bp = np.flatnonzero(~t2dm & (rng.random(n) < share))
            days = self._uniform(obs_start[bp], obs_end[bp])
            self._lab_rows(rows, key, bp, days, latent[key][bp] + rng.normal(0.0, _LAB_NOISE[key], len(bp)))
        outside = self._outside_persons("measurement")
        rows.add(outside, measurement_concept_id=3025315,
                 measurement_date=self._outside_day(outside, obs_start, obs_end),
                 value_as_number=np.round(latent["weight"][outside], 1), unit_concept_id=9529,
                 measurement_source_value=_CODE[3025315], unit_source_value="kg")
        unmapped = self._unmapped_persons("measurement")
        rows.add(unmapped, measurement_concept_id=0,
                 measurement_date=self._uniform(obs_start[unmapped], obs_end[unmapped]),
                 value_as_number=np.round(latent["glucose"][unmapped] * 1.1), unit_concept_id=8840,
                 measurement_source_value="POC-GLU", unit_source_value="mg/dL")
        frame, _ = rows.build("measurement_id", self.ids["measurement"], self.first_person_id, "measurement_date",
                              ("measurement_date",))
        self._next_ids("measurement", len(frame))
        frame["measurement_type_concept_id"] = LAB_TYPE
        return frame

    def _glucose_moments(self) -> tuple[int, float, float]:
        """(n, mean, M2) of the latest non-NULL pre-index glucose (mg/dL) per target person."""
        if not self.glucose_rows:
            return (0, 0.0, 0.0)
        person = np.concatenate([r[0] for r in self.glucose_rows])
        offset = np.concatenate([r[1] for r in self.glucose_rows])
        value = np.concatenate([r[2] for r in self.glucose_rows])
        order = np.lexsort((offset, person))
        _, first = np.unique(person[order], return_index=True)
        last = value[order][first]
        if len(last) == 0:
            return (0, 0.0, 0.0)
        mean = float(last.mean())
        return (len(last), mean, float(((last - mean) ** 2).sum()))

    def _observations(self) -> pd.DataFrame:
        pp = self.people
        obs_start, obs_end = pp.obs_start, pp.obs_end
        rows = _Rows()
        s = np.repeat(np.flatnonzero(pp.smoker), self.rng.integers(1, 3, int(pp.smoker.sum())))
        rows.add(s, observation_concept_id=SMOKER, observation_date=self._uniform(obs_start[s], obs_end[s]),
                 observation_source_value="current smoker")
        frame, _ = rows.build("observation_id", self.ids["observation"], self.first_person_id, "observation_date",
                              ("observation_date",))
        self._next_ids("observation", len(frame))
        frame["observation_type_concept_id"] = EHR
        return frame

    def _add_domain_rows(self, tables: dict[str, pd.DataFrame], site_index_seed: tuple[int, int, int]) -> None:
        """Append smoking status (a value concept), a questionnaire score and a unitless lab (issue 13).

        The rows come from their own random stream and are appended after every other row of the chunk
        (ids continue the table's), so the rows generated before this addition are unchanged.  Per person,
        with a share of persons each: smoking status answers (current smokers answer "current", the others
        "former" or "never") on 1-2 days in the observation period; a PHQ-9 score (0-27, no unit); an INR
        (UCUM ``{ratio}``, dimensionless).
        """
        rng = np.random.default_rng([*site_index_seed, 13])
        pp, n = self.people, self.n
        obs_start, obs_end = pp.obs_start, pp.obs_end

        def uniform(low: np.ndarray, high: np.ndarray) -> np.ndarray:
            return low + np.floor(rng.random(len(low)) * (high - low + 1)).astype(np.int64)

        answered = np.flatnonzero(rng.random(n) < 0.8)
        sp = np.repeat(answered, rng.integers(1, 3, len(answered)))
        other = np.where(rng.random(len(sp)) < 0.45, vocab.SMOKING_FORMER, vocab.SMOKING_NEVER)
        answer = np.where(pp.smoker[sp], vocab.SMOKING_CURRENT, other)
        rows = _Rows()
        rows.add(sp, observation_concept_id=vocab.SMOKING_STATUS, observation_date=uniform(obs_start[sp], obs_end[sp]),
                 value_as_concept_id=answer, observation_source_value="72166-2")
        scored = np.flatnonzero(rng.random(n) < 0.5)
        qp = np.repeat(scored, rng.integers(1, 4, len(scored)))
        rows.add(qp, observation_concept_id=vocab.PHQ9_SCORE, observation_date=uniform(obs_start[qp], obs_end[qp]),
                 value_as_number=rng.integers(0, 28, len(qp)).astype(np.float64), observation_source_value="44261-6")
        frame, _ = rows.build("observation_id", self.ids["observation"], self.first_person_id, "observation_date",
                              ("observation_date",))
        self._next_ids("observation", len(frame))
        frame["observation_type_concept_id"] = EHR
        tables["observation"] = pd.concat([tables["observation"], frame], ignore_index=True)

        tested = np.flatnonzero(rng.random(n) < 0.4)
        ip = np.repeat(tested, rng.integers(1, 3, len(tested)))
        unit = np.full(len(ip), vocab.RATIO_UNIT)  # a dimensionless UCUM unit (NULL units are a CDM warning)
        labs = _Rows()
        labs.add(ip, measurement_concept_id=vocab.INR, measurement_date=uniform(obs_start[ip], obs_end[ip]),
                 value_as_number=np.round(np.clip(rng.normal(1.1, 0.25, len(ip)), 0.7, 4.0), 2), unit_concept_id=unit,
                 measurement_source_value="6301-6")
        frame, _ = labs.build("measurement_id", self.ids["measurement"], self.first_person_id, "measurement_date",
                              ("measurement_date",))
        self._next_ids("measurement", len(frame))
        frame["measurement_type_concept_id"] = LAB_TYPE
        tables["measurement"] = pd.concat([tables["measurement"], frame], ignore_index=True)

    def _deaths(self) -> pd.DataFrame:
        rng, n, pp = self.rng, self.n, self.people
        obs_end = pp.obs_end
        dies = (obs_end < DATA_END) & (rng.random(n) < _sigmoid(-3.2 + 0.06 * (pp.age_index - 60) + 1.0 * pp.outcome))
        d = np.flatnonzero(dies)
        return pd.DataFrame({
            "person_id": self.first_person_id + d,
            "death_date": obs_end[d].astype("datetime64[D]"),
            "death_type_concept_id": EHR,
        })

    def _specimens(self) -> tuple[pd.DataFrame, list[tuple[int, int, str, np.ndarray]]]:
        rng, pp = self.rng, self.people
        pid, index, u_omics = pp.pid, pp.index, pp.u_omics
        s = np.flatnonzero(pp.linked_omics)
        first = self._next_ids("specimen", len(s))
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

    def _images(self, procedure_ids: np.ndarray, image_day: np.ndarray) -> tuple[pd.DataFrame, list[_ImageJob]]:
        rng, pp = self.rng, self.people
        pid, birth, male, u_image = pp.pid, pp.birth, pp.male, pp.u_image
        s = np.flatnonzero(pp.linked_image)
        if len(s):
            from pydicom.uid import generate_uid
        first = self._next_ids("image_occurrence", len(s))
        image_id = first + np.arange(len(s))
        size = IMAGE_SIZE
        yy, xx = np.mgrid[0:size, 0:size]
        cx = size / 2 + rng.normal(0.0, 4.0, len(s))
        cy = size / 2 + rng.normal(0.0, 4.0, len(s))
        # The latent signal sets the blob's brightness and its width: the width survives the per-image
        # intensity normalization of omopfl's linking (which maps every blob's peak to about 1).
        amplitude = np.clip(520.0 + 240.0 * u_image[s], 40.0, 1600.0)
        width = np.clip(6.0 + 1.5 * u_image[s], 2.5, 10.0)
        blob = amplitude[:, None, None] * np.exp(
            -((xx[None] - cx[:, None, None]) ** 2 + (yy[None] - cy[:, None, None]) ** 2)
            / (2 * width[:, None, None] ** 2))
        pixels = np.clip(900.0 + blob + rng.normal(0.0, 25.0, (len(s), size, size)), 0, 65535).astype(np.uint16)
        jobs: list[_ImageJob] = []
        study, series, paths = [], [], []
        for j, person in enumerate(s):
            # pydicom's root with a SHA-512 of the entropy: deterministic (prefix=None would ignore it).
            entropy = f"omopfl-synth|{self.site}|{self.seed}|{int(pid[person])}|{int(image_id[j])}|"
            study_uid = generate_uid(entropy_srcs=[entropy + "study"])
            series_uid = generate_uid(entropy_srcs=[entropy + "series"])
            sop_uid = generate_uid(entropy_srcs=[entropy + "sop"])
            frame_uid = generate_uid(entropy_srcs=[entropy + "frame"])
            path = f"{int(pid[person])}/mr_{int(image_id[j])}.dcm"
            study.append(study_uid)
            series.append(series_uid)
            paths.append(path)
            jobs.append(_ImageJob(int(pid[person]), int(birth[person]), bool(male[person]), int(image_day[j]), path,
                                  study_uid, series_uid, sop_uid, frame_uid, pixels[j]))
        frame = pd.DataFrame({
            "image_occurrence_id": image_id,
            "person_id": pid[s],
            "procedure_occurrence_id": np.asarray(procedure_ids, dtype=np.int64),
            "local_path": np.array(paths, dtype=object),
            "image_occurrence_date": image_day.astype("datetime64[D]"),
            "image_study_uid": np.array(study, dtype=object),
            "image_series_uid": np.array(series, dtype=object),
            "modality_concept_id": MRI,
        })
        return frame, jobs


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def _date_text(day: int) -> str:
    return str(np.datetime64(day, "D")).replace("-", "")


def _write_dicom(root: Path, job: _ImageJob) -> None:
    """One 64x64 MR slice (uint16, explicit VR little endian) with the attributes readers require."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = job.sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = job.sop_uid
    ds.StudyInstanceUID = job.study_uid
    ds.SeriesInstanceUID = job.series_uid
    ds.FrameOfReferenceUID = job.frame_uid
    ds.PatientID = str(job.person_id)
    ds.PatientName = f"SYNTHETIC^{job.person_id}"
    ds.PatientBirthDate = _date_text(job.birth_day)
    ds.PatientSex = "M" if job.male else "F"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = _date_text(job.study_day)
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.Modality = "MR"
    ds.Manufacturer = "omopfl synthetic"
    ds.BodyPartExamined = "HEART"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.EchoTime = 20
    ds.RepetitionTime = 500
    ds.MagneticFieldStrength = 1.5
    ds.SliceThickness = 8
    ds.PixelSpacing = [2, 2]
    ds.ImagePositionPatient = [0, 0, 0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = job.pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = job.pixels.astype("<u2").tobytes()
    path = root / job.path
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _write_omics(root: Path, manifest: TextIO, jobs: list[tuple[int, int, str, np.ndarray]]) -> None:
    for specimen_id, person_id, name, expression in jobs:
        lines = ["gene,value", *(f"{g},{v:.4f}" for g, v in zip(OMICS_GENES, expression, strict=True))]
        (root / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
        manifest.write(f"{specimen_id},{person_id},{name}\n")


# ----------------------------------------------------------------------------------------------
# Sites
# ----------------------------------------------------------------------------------------------


def _health_system(site: str) -> dict[str, pd.DataFrame]:
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


_ID_TABLES = ("observation_period", "visit_occurrence", "condition_occurrence", "drug_exposure",
              "procedure_occurrence", "measurement", "observation", "specimen", "image_occurrence")


class _Moments:
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
class _SiteTruth:
    persons: int = 0
    male: int = 0
    female: int = 0
    t2dm: int = 0
    target: int = 0
    outcome: int = 0
    images: int = 0
    omics: int = 0
    glucose: _Moments = field(default_factory=_Moments)
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


@dataclass(frozen=True)
class _Target:
    """Where one site's CDM goes."""

    url: str
    backend: str
    cdm_schema: str
    results_schema: str


def _is_driver_error(exc: BaseException) -> bool:
    """SQLAlchemy's wrapped driver errors, and raw psycopg/DuckDB errors from the bulk-copy path."""
    if isinstance(exc, sa.exc.DBAPIError):
        return True
    module = type(exc).__module__.split(".")[0]
    return module in {"psycopg2", "psycopg", "duckdb", "_duckdb"}


@contextmanager
def _site_connection(target: _Target, site: str) -> Iterator[sa.Connection]:
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
            if not _is_driver_error(exc):
                raise
            raise DatabaseError(f"writing {site} failed ({describe_driver_error(exc)})") from None
        finally:
            conn.close()
    finally:
        engine.dispose()


def _add_primary_keys(conn: sa.Connection, schema: str) -> None:
    for table in CDM_TABLES:
        keys = [c.name for c in table_columns(table) if c.primary_key]
        if keys:
            columns = ", ".join(quote_identifier(k) for k in keys)
            conn.execute(sa.text(
                f"ALTER TABLE {quote_identifier(schema)}.{quote_identifier(table)} ADD PRIMARY KEY ({columns})"))


def _generate_site(*, site: str, site_index: int, profile: SiteProfile, persons: int, seed: int, target: _Target,
                   site_dir: Path, image_share: float, omics_share: float, chunk_size: int,
                   advance: Callable[[int], None]) -> SiteSummary:
    image_root, omics_root = site_dir / "images", site_dir / "omics"
    for folder in (image_root, omics_root):
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    truth = _SiteTruth()
    ids = dict.fromkeys(_ID_TABLES, 1)
    first_person_id = (site_index + 1) * PERSON_ID_STRIDE + 1
    with _site_connection(target, site) as conn, (omics_root / "manifest.csv").open("w", encoding="utf-8") as manifest:
        manifest.write("specimen_id,person_id,path\n")
        if target.backend == "postgresql":
            for schema in (target.cdm_schema, target.results_schema):
                conn.execute(sa.text(f"DROP SCHEMA IF EXISTS {quote_identifier(schema)} CASCADE"))
        create_cdm(conn, target.cdm_schema, primary_keys=False)
        create_results(conn, target.results_schema)
        for table, frame in {**vocab.vocabulary_frames(), **_health_system(site)}.items():
            bulk_insert(conn, target.cdm_schema, table, frame)
        for chunk_index, start in enumerate(range(0, persons, chunk_size)):
            n = min(chunk_size, persons - start)
            chunk = _ChunkBuilder(site=site, site_index=site_index, profile=profile, seed=seed,
                                  chunk_index=chunk_index, n=n, first_person_id=first_person_id + start, ids=ids,
                                  image_share=image_share, omics_share=omics_share).build()
            for table, frame in chunk.tables.items():
                bulk_insert(conn, target.cdm_schema, table, frame)
            for job in chunk.images:
                _write_dicom(image_root, job)
            _write_omics(omics_root, manifest, chunk.omics)
            truth.add(chunk.truth)
            del chunk
            advance(n)
        _add_primary_keys(conn, target.cdm_schema)
    return _summary(site, profile, target, seed, truth)


def _summary(site: str, profile: SiteProfile, target: _Target, seed: int, truth: _SiteTruth) -> SiteSummary:
    probability = np.concatenate([s[0] for s in truth.scores]) if truth.scores else np.empty(0)
    outcome = np.concatenate([s[1] for s in truth.scores]) if truth.scores else np.empty(0, dtype=bool)
    rows = {table: truth.rows.get(table, 0) for table in truth.rows}
    for table, frame in {**vocab.vocabulary_frames(), **_health_system(site)}.items():
        rows[table] = len(frame)
    glucose = truth.glucose.as_dict()
    glucose["definition"] = DEFINITIONS["glucose_last_pre_index"]
    return SiteSummary(
        site=site,
        profile=profile.label,
        backend=target.backend,
        cdm_schema=target.cdm_schema,
        results_schema=target.results_schema,
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


def _toml_string(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def _relative(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()


def _write_adapter(adapters_dir: Path, site: str, target: _Target, site_dir: Path, url_env: str | None,
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
                target = _Target(pg_url, "postgresql", f"{site}_cdm", f"{site}_results")
            else:
                database = site_dir / DUCKDB_FILE
                for stale in (database, database.with_name(database.name + ".wal")):
                    stale.unlink(missing_ok=True)
                target = _Target(f"duckdb:///{database}", "duckdb", "cdm", "results")
            summary = _generate_site(site=site, site_index=k, profile=profiles[k], persons=size,
                                     seed=int(seed), target=target, site_dir=site_dir, image_share=image_share,
                                     omics_share=omics_share, chunk_size=chunk_size, advance=advances[k])
            summary.adapter = _write_adapter(adapters_dir, site, target, site_dir, url_env, int(seed))
            (site_dir / "truth.json").write_text(json.dumps(summary.truth_dict(), indent=2) + "\n", encoding="utf-8")
            summaries.append(summary)
    return summaries

