"""The latent clinical story of synthetic persons: calendar, diagnoses, lab levels and the outcome model.

Part of the synthetic generator (:mod:`omopfl.synth`).  The outcome probability is a logistic function
of age, sex, HbA1c, BMI, hypertension, creatinine and metformin use, plus two latent signals that only
the person's image (``u_image``) and expression profile (``u_omics``) carry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from omopfl.synth.profiles import SiteProfile

__all__ = [
    "DATA_END",
    "LAB_WINDOW_DAYS",
    "OUTCOME_WINDOW",
    "People",
    "draw_people",
    "sigmoid",
    "uniform_days",
]

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


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def calibrate(log_odds: np.ndarray, prevalence: float) -> float:
    """The shift ``c`` with ``mean(sigmoid(log_odds + c)) == prevalence`` (bisection; no random draw)."""
    low, high = -40.0, 40.0
    for _ in range(80):
        mid = (low + high) / 2
        if float(np.mean(sigmoid(log_odds + mid))) < prevalence:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def uniform_days(rng: np.random.Generator, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Uniform integer days in [low, high] (arrays)."""
    return low + np.floor(rng.random(len(low)) * (high - low + 1)).astype(np.int64)


@dataclass
class People:
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


def draw_people(rng: np.random.Generator, profile: SiteProfile, n: int, first_person_id: int,
                image_share: float, omics_share: float) -> People:
    """The latent clinical story of each person: who has diabetes, when, and how likely the outcome is."""
    p = profile
    pid = first_person_id + np.arange(n)

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
    t2dm = rng.random(n) < sigmoid(logit(p.t2dm_prevalence) + 0.035 * (age_ref - 55) + 0.09 * (bmi - 27))
    t1dm = ~t2dm & (rng.random(n) < 0.006)
    index_offset = rng.integers(30, span - PRIOR_OBSERVATION_DAYS + 1)
    index = obs_start + index_offset  # used for diabetic persons only
    target = t2dm & (index_offset >= PRIOR_OBSERVATION_DAYS)
    age_index = (index - birth) / 365.25
    hba1c = np.where(t2dm, np.clip(rng.normal(7.6, 1.3, n), 5.8, 14.0), np.clip(rng.normal(5.4, 0.35, n), 4.2, 6.4))
    glucose = np.clip(28.7 * hba1c - 46.7 + rng.normal(0.0, 18.0, n), 55.0, 600.0)
    ckd = rng.random(n) < sigmoid(-3.0 + 0.05 * (age_index - 55) + 0.9 * t2dm)
    creatinine = np.exp(rng.normal(np.log(np.where(male, 0.95, 0.78)), 0.2)) * np.where(ckd, 1.9, 1.0)
    htn = rng.random(n) < sigmoid(-0.9 + 0.05 * (age_index - 55) + 0.6 * t2dm + 0.06 * (bmi - 27))
    hyperlipidemia = rng.random(n) < sigmoid(-1.4 + 0.03 * (age_index - 55) + 0.7 * t2dm)
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
        log_odds = log_odds + calibrate(log_odds[t2dm], p.outcome_prevalence)
    probability = sigmoid(log_odds)
    outcome = t2dm & (rng.random(n) < probability)
    image_draw = rng.random(n)
    omics_draw = rng.random(n)
    linked_image = target & (image_draw < image_share)
    linked_omics = target & (omics_draw < omics_share)
    latent = {"hba1c": hba1c, "glucose": glucose, "creatinine": creatinine, "ldl": ldl, "bmi": bmi,
              "weight": weight, "height": height, "sbp": sbp}

    # Days of diagnoses that precede the index date of diabetic persons.
    pre_index_or_any = np.where(t2dm, index_offset, span + 1)
    htn_day = obs_start + np.floor(rng.random(n) * pre_index_or_any).astype(np.int64)
    ckd_day = obs_start + np.floor(rng.random(n) * pre_index_or_any).astype(np.int64)
    hl_day = uniform_days(rng, obs_start, obs_end)
    return People(pid, male, birth, race, hispanic, obs_start, obs_end, t2dm, t1dm, index, target, age_index,
                  bmi, htn, htn_day, ckd, ckd_day, hyperlipidemia, hl_day, metformin, smoker, probability, outcome,
                  u_image, u_omics, linked_image, linked_omics, latent)
