"""How the synthetic sites differ from each other, what they are called and how many persons each has.

Part of the synthetic generator (:mod:`omopfl.synth`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from omopfl.errors import ConfigError

__all__ = [
    "DEFAULT_SIZES",
    "DEFAULT_SIZE_BEYOND",
    "MAX_SITES",
    "PERSON_ID_STRIDE",
    "PROFILES",
    "SiteProfile",
    "label_skew_profiles",
    "site_names",
    "split_persons",
]

MAX_SITES = 100
PERSON_ID_STRIDE = 10_000_000  # site k's person ids are (k + 1) * stride + 1 ...


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
