"""PatientLevelPrediction-style performance of a risk model, under the site's release rule.

What OHDSI's PatientLevelPrediction reports for a validated model, computed at the site from its
labels and the model's predicted risks:

* discrimination: AUC with its 95% confidence interval (DeLong's variance), AUPRC (average
  precision), both as scikit-learn defines them;
* accuracy of the risks: the Brier score, and the calibration slope and intercept of the logistic
  recalibration ``logit P(y = 1) = intercept + slope * logit(p)`` (1 and 0 for a calibrated model);
* calibration in risk groups (deciles of predicted risk), a threshold table (sensitivity,
  specificity, PPV, NPV at a set of thresholds), and a demographic summary (age group, sex).

The last three are tables of person counts and must obey the release rule (:mod:`omopfl.release`):
every count, and every difference between two released counts, is 0 or at least ``k``. Risk groups
are therefore made of *bins* of adjacent predicted risks, merged until each bin's outcomes and
non-outcomes are each 0 or at least ``k``; the threshold table is read at bin edges only, so the
difference between any two of its rows is a sum of bins (again 0 or at least ``k``). The ROC and
calibration plots are drawn from these released tables, never from individual risks. A demographic
group is released when its persons, outcomes and non-outcomes are each 0 or at least ``k``; the
others are pooled into ``other``, which obeys the same rule (a released group joins it until it does).

DeLong's variance is written here (about 20 lines) because neither scikit-learn nor SciPy ships it;
everything else is scikit-learn's.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from omopfl.release import small

__all__ = ["AGE_GROUPS", "auc_delong", "calibration_line", "risk_bins", "threshold_table", "calibration_groups",
           "demographic_summary", "performance"]

AGE_GROUPS: tuple[tuple[str, float, float], ...] = (
    ("0-17", 0, 18), ("18-44", 18, 45), ("45-64", 45, 65), ("65-74", 65, 75), ("75-84", 75, 85), ("85+", 85, 1e9))
"""Age groups of the demographic summary (years at index; lower bound included)."""

_DECIMALS = 4


def _arrays(y_true: Any, y_prob: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.float64).reshape(-1) >= 0.5
    p = np.asarray(y_prob, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError("labels and predictions must have the same length")
    if not np.isfinite(p).all():
        raise ValueError("predictions must be finite")
    return y, p


def _round(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), _DECIMALS)


def auc_delong(y_true: Any, y_prob: Any, level: float = 0.95) -> tuple[float, float, float]:
    """(AUC, lower, upper): the AUC and its ``level`` confidence interval from DeLong's variance.

    The interval is clipped to [0, 1]; all three are NaN when a class is empty.
    """
    from scipy.stats import norm, rankdata

    y, p = _arrays(y_true, y_prob)
    pos, neg = p[y], p[~y]
    m, n = pos.size, neg.size
    if m == 0 or n == 0:
        return math.nan, math.nan, math.nan
    ranks = rankdata(np.concatenate([pos, neg]))  # mid-ranks: ties count one half
    auc = (ranks[:m].sum() - m * (m + 1) / 2) / (m * n)
    v10 = (ranks[:m] - rankdata(pos)) / n  # each positive's share of negatives ranked below it
    v01 = 1.0 - (ranks[m:] - rankdata(neg)) / m  # each negative's share of positives ranked above it
    var = (np.var(v10, ddof=1) / m if m > 1 else 0.0) + (np.var(v01, ddof=1) / n if n > 1 else 0.0)
    half = float(norm.ppf(0.5 + level / 2) * math.sqrt(max(var, 0.0)))
    return float(auc), max(0.0, float(auc) - half), min(1.0, float(auc) + half)


def calibration_line(y_true: Any, y_prob: Any) -> tuple[float, float]:
    """(slope, intercept) of the logistic recalibration of ``y`` on ``logit(p)`` (unpenalized)."""
    from sklearn.linear_model import LogisticRegression

    y, p = _arrays(y_true, y_prob)
    if y.all() or not y.any():
        return math.nan, math.nan
    clipped = np.clip(p, 1e-12, 1 - 1e-12)
    logit = np.log(clipped / (1 - clipped)).reshape(-1, 1)
    fit = LogisticRegression(C=np.inf, max_iter=1000).fit(logit, y.astype(int))  # C=inf: unpenalized
    return float(fit.coef_[0, 0]), float(fit.intercept_[0])


def risk_bins(y_true: Any, y_prob: Any, k: int, groups: int = 10) -> list[dict[str, Any]]:
    """Adjacent bins of predicted risk, each holding 0 or at least ``k`` outcomes and non-outcomes.

    Starts from ``groups`` quantile groups (persons with the same risk stay together) and merges a bin
    into its right neighbour until the rule holds; the last bin merges leftwards. Each bin:
    ``low``/``high`` (its smallest and largest risk), ``n``, ``outcomes``, ``mean_predicted``.
    """
    y, p = _arrays(y_true, y_prob)
    if p.size == 0:
        return []
    order = np.argsort(p, kind="stable")
    p, y = p[order], y[order]
    edges = np.unique(np.quantile(p, np.linspace(0, 1, groups + 1)[1:-1]))
    cut = np.searchsorted(p, edges, side="right")  # bin j holds p <= edges[j]
    bounds = [0, *[int(c) for c in cut if 0 < c < p.size], p.size]
    bins = [(a, b) for a, b in itertools.pairwise(bounds) if b > a]

    def bad(a: int, b: int) -> bool:
        events = int(y[a:b].sum())
        return small(events, k) or small((b - a) - events, k)

    merged: list[list[int]] = []
    for a, b in bins:
        if merged and bad(*merged[-1]):
            merged[-1][1] = b
        else:
            merged.append([a, b])
    while len(merged) > 1 and bad(*merged[-1]):
        last = merged.pop()
        merged[-1][1] = last[1]
    out = []
    for a, b in merged:
        if bad(a, b):  # a single bin that breaks the rule: nothing about the distribution is released
            return []
        out.append({"low": float(p[a]), "high": float(p[b - 1]), "n": b - a, "outcomes": int(y[a:b].sum()),
                    "mean_predicted": _round(float(p[a:b].mean()))})
    return out


def threshold_table(bins: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Sensitivity, specificity, PPV, NPV and the confusion counts at each boundary between bins.

    A person is predicted positive at threshold ``t`` when their risk is at least ``t``; reading the
    table only between bins keeps every difference between rows a sum of released bins. The
    threshold shown is the midpoint between two bins (0 for the first row), never one person's risk.
    """
    positives = sum(int(b["outcomes"]) for b in bins)
    negatives = sum(int(b["n"]) - int(b["outcomes"]) for b in bins)
    rows = []
    for j, b in enumerate(bins):
        tp = sum(int(c["outcomes"]) for c in bins[j:])
        fp = sum(int(c["n"]) - int(c["outcomes"]) for c in bins[j:])
        fn, tn = positives - tp, negatives - fp

        def ratio(a: int, c: int) -> float | None:
            return _round(a / c) if c else None

        # between two bins, not a person's own risk: the midpoint of the gap
        threshold = 0.0 if j == 0 else (float(bins[j - 1]["high"]) + float(b["low"])) / 2
        rows.append({"threshold": _round(threshold), "tp": tp, "fp": fp, "fn": fn, "tn": tn,
                     "sensitivity": ratio(tp, positives), "specificity": ratio(tn, negatives),
                     "ppv": ratio(tp, tp + fp), "npv": ratio(tn, tn + fn)})
    return rows


def calibration_groups(bins: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Observed outcome rate beside the mean predicted risk, per risk bin (the calibration plot)."""
    return [{"group": j + 1, "n": int(b["n"]), "outcomes": int(b["outcomes"]),
             "observed": _round(int(b["outcomes"]) / int(b["n"])), "mean_predicted": b["mean_predicted"]}
            for j, b in enumerate(bins)]


def _cells_ok(n: int, outcomes: int, k: int) -> bool:
    return not (small(n, k) or small(outcomes, k) or small(n - outcomes, k))


def _group_rows(labels: np.ndarray, y: np.ndarray, p: np.ndarray, names: Sequence[str], k: int) -> list[dict]:
    stats = []
    for name in names:
        mask = labels == name
        stats.append({"group": name, "n": int(mask.sum()), "outcomes": int(y[mask].sum()),
                      "mean_predicted": _round(float(p[mask].mean())) if mask.any() else None})
    released = [s for s in stats if s["n"] > 0 and _cells_ok(s["n"], s["outcomes"], k)]
    while True:
        other = [s for s in stats if s["n"] > 0 and s not in released]
        n = sum(s["n"] for s in other)
        outcomes = sum(s["outcomes"] for s in other)
        if _cells_ok(n, outcomes, k) or not released:
            break
        released.remove(min(released, key=lambda s: s["n"]))  # the smallest released group joins 'other'
    rows = [{**s, "observed": _round(s["outcomes"] / s["n"])} for s in released]
    if n and _cells_ok(n, outcomes, k):
        mean = float(p[np.isin(labels, [s["group"] for s in other])].mean())
        rows.append({"group": "other", "n": n, "outcomes": outcomes, "mean_predicted": _round(mean),
                     "observed": _round(outcomes / n)})
    return rows


def demographic_summary(y_true: Any, y_prob: Any, k: int, *, age: Any = None,
                        sex: Sequence[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Persons, outcomes, observed rate and mean predicted risk per age group and per sex."""
    y, p = _arrays(y_true, y_prob)
    out: dict[str, list[dict[str, Any]]] = {}
    if age is not None:
        years = np.asarray(age, dtype=np.float64).reshape(-1)
        labels = np.full(years.shape, "unknown", dtype=object)
        for name, low, high in AGE_GROUPS:
            labels[(years >= low) & (years < high)] = name
        out["age_group"] = _group_rows(labels, y, p, [g[0] for g in AGE_GROUPS] + ["unknown"], k)
    if sex is not None:
        labels = np.asarray(list(sex), dtype=object)
        out["sex"] = _group_rows(labels, y, p, sorted(set(labels.tolist())), k)
    return out


def performance(y_true: Any, y_prob: Any, k: int, *, age: Any = None, sex: Sequence[str] | None = None,
                groups: int = 10) -> dict[str, Any]:
    """Everything above for one validation, or ``{"n": ..., "withheld": True}`` when the rule forbids it.

    Released only when the outcomes and non-outcomes are each at least ``k``.
    """
    from sklearn.metrics import average_precision_score, brier_score_loss

    y, p = _arrays(y_true, y_prob)
    n, outcomes = int(y.size), int(y.sum())
    if outcomes < k or n - outcomes < k:
        return {"withheld": True, "reason": f"fewer than {k} outcomes or non-outcomes (the site's min_cell_count)"}
    auc, low, high = auc_delong(y, p)
    slope, intercept = calibration_line(y, p)
    bins = risk_bins(y, p, k, groups)
    return {
        "withheld": False, "n": n, "outcomes": outcomes,
        "auc": _round(auc), "auc_ci95": [_round(low), _round(high)],
        "auprc": _round(float(average_precision_score(y, p))),
        "brier": _round(float(brier_score_loss(y, p))),
        "calibration_slope": _round(slope), "calibration_intercept": _round(intercept),
        "calibration": calibration_groups(bins),
        "thresholds": threshold_table(bins),
        "demographics": demographic_summary(y, p, k, age=age, sex=sex),
    }
