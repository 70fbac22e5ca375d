"""The release rule: every number a site sends, written down once.

``k`` is the site's ``min_cell_count`` (its adapter; default 10).  A *cell* is a number of persons;
a cell is *small* when it is between 1 and ``k - 1``.  No released number, and no number that can be
derived from what a site sends (complements, differences between its numbers in one reply), may be
a small cell.

Statistics (``query.stats``, per feature: count ``n``, ``mean``, sum of squared deviations ``m2``)
    * a site with fewer than ``k`` persons sends nothing, not even its count;
    * a feature is released only if ``n >= k`` and its missing count ``persons - n`` is not small;
    * a 0/1 feature (a concept set's presence, a one-hot level, a missingness indicator): neither its
      ones (``mean * n``) nor its zeros is small;
    * a count feature (the study's ``aggregate = "count"``): neither the persons with a count of 0 nor
      those with a count above 0 is small (its sum and sum of squares bound how many have one);
    * the levels of one categorical feature (``sex_male``, ``sex_female``...): the persons in none
      of the released levels (``persons - sum of ones``; e.g. unknown sex) is not small, else the
      whole group is withheld.
Evaluation metrics (``evaluate``, and the evaluation a ``train`` reply carries)
    released only when every cell of the confusion matrix at the study's operating threshold
    (``[training] threshold``, default 0.5; for a rare outcome choose one near its prevalence) holds at
    least ``k`` persons (so both classes hold at least ``2k``: AUC is over at least ``k`` of each),
    rounded to :data:`METRIC_DECIMALS` decimals; else the record holds only ``num-examples = 0``
    (withheld).  A crafted model (constant predictions, a threshold isolating a few persons) makes a
    cell small and gets nothing.
Training replies (``train``)
    weights and ``num-examples`` leave only when the train rows are at least ``k`` and the test rows
    are 0 or at least ``k`` (the statistics' ``persons`` minus ``num-examples`` is the test split);
    else the site sends back the weights it received and ``num-examples = 0``.

What remains, and how differential privacy covers it
    The rule holds within one reply.  Two releases can still differ by a few persons: two crafted
    models whose predictions differ for one person, or two studies whose cohorts differ by one
    person, each pass the rule while their difference is one person's label.  The site bounds this
    (only approved studies, a round limit per run, every release in its audit log) and removes it
    formally with differential privacy where its policy asks for it: noise on released statistics
    (:func:`omopfl.moment_noise.noisy_moments`) and DP-SGD for training updates, with a privacy budget per
    approved study.  Model weights themselves are not cells; without DP-SGD they carry no formal
    protection.

:func:`check_reply` is the last check at the site's trust boundary
(:mod:`omopfl.federation.site.app`): it reads the reply as it would leave and refuses it (the site
then sends only a fixed code) if any count in it breaks the rule.

Pure functions (numpy only).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from omopfl.errors import ReleaseViolation

__all__ = ["METRIC_DECIMALS", "ReleaseViolation", "small", "moments", "evaluation", "confusion", "may_train",
           "check_reply"]

METRIC_DECIMALS = 4
"""Evaluation metrics leave rounded to this many decimals (coarsening: less room to encode counts)."""


def small(count: float, k: int) -> bool:
    """Is ``count`` persons a small cell (between 1 and ``k - 1``)?"""
    return 0 < count < k


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------


def moments(x: np.ndarray, names: Sequence[str], persons: int, k: int, *,
            groups: Mapping[str, Sequence[str]] | None = None, counts: Iterable[str] = ()) -> Any:
    """The :class:`omopfl.suppression.Released` moments of ``x`` under the rule (see the module docstring).

    Parameters
    ----------
    x:
        Rows x features, NaN for missing.
    names, persons:
        Feature names (columns of ``x``) and the number of persons (rows).
    k:
        The site's ``min_cell_count``.
    groups:
        One-hot levels of each categorical feature, e.g. ``{"sex": ["sex_male", "sex_female"]}``.
    counts:
        Names of count features.
    """
    from omopfl.moments import Moments
    from omopfl.suppression import Released, binary_columns, suppress

    names = list(names)
    exact = Moments.from_array(x, names, persons=persons)
    released = suppress(exact, k, binary=binary_columns(x))
    if released.withheld:
        return released
    keep = np.array(released.released, dtype=bool)
    index = {name: j for j, name in enumerate(names)}
    x = np.asarray(x, dtype=np.float64)
    for name in counts:
        j = index.get(name)
        if j is None:
            continue
        column = x[:, j]
        finite = column[~np.isnan(column)]
        if small(int(np.count_nonzero(finite > 0)), k) or small(int(np.count_nonzero(finite == 0)), k):
            keep[j] = False
    for levels in (groups or {}).values():
        columns = [index[level] for level in levels if level in index]
        if not columns:
            continue
        ones = (x[:, columns] == 1).sum(axis=0)
        if small(int(persons - ones.sum()), k) or not all(keep[j] for j in columns):
            keep[columns] = False
    if np.array_equal(keep, np.array(released.released, dtype=bool)):
        return released
    return Released(tuple(names), tuple(bool(v) for v in keep), exact.persons, exact.n[keep], exact.mean[keep],
                    exact.m2[keep])


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------


def confusion(y_true: Any, y_prob: Any, threshold: float = 0.5) -> tuple[int, int, int, int]:
    """(TP, FP, FN, TN) at ``threshold`` (a person is predicted positive when ``y_prob >= threshold``)."""
    y = np.asarray(y_true, dtype=np.float64).reshape(-1) >= 0.5
    p = np.asarray(y_prob, dtype=np.float64).reshape(-1) >= threshold
    return (int(np.sum(y & p)), int(np.sum(~y & p)), int(np.sum(y & ~p)), int(np.sum(~y & ~p)))


def evaluation(y_true: Any, y_prob: Any, loss: float, k: int, threshold: float = 0.5) -> dict[str, float] | None:
    """The released metrics (``loss``, ``auc``, ``accuracy``, ``f1``, ``kappa``, ``n``) at the study's
    operating ``threshold``, or None (withheld)."""
    from omopfl.models import binary_metrics

    cells = confusion(y_true, y_prob, threshold)
    if min(cells) < k:
        return None
    metrics: dict[str, float] = {"loss": float(loss), **binary_metrics(y_true, y_prob, threshold)}
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if key == "n":
            out[key] = int(value)
        elif isinstance(value, float) and math.isfinite(value):
            out[key] = round(value, METRIC_DECIMALS)
    return out


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


def may_train(train_rows: int, test_rows: int, k: int) -> bool:
    """May the weights learnt from ``train_rows`` (and their count) leave?"""
    return train_rows >= k and not small(test_rows, k)


# --------------------------------------------------------------------------------------------
# the last check of a reply as it leaves
# --------------------------------------------------------------------------------------------

_WEIGHT = "num-examples"


def check_reply(message_type: str, records: Mapping[str, Mapping[str, Any]], k: int) -> None:
    """Raise :class:`ReleaseViolation` if a count in the reply (record name -> key -> value) breaks the rule.

    Checks what can be read off the reply itself: every ``num-examples`` is 0 or at least ``k`` (an
    evaluation's at least ``4k``: four cells of ``k``), a statistics reply's ``persons`` and every
    released ``n`` are at least ``k`` with ``persons - n`` not small.
    """
    for name, record in records.items():
        weight = record.get(_WEIGHT)
        if isinstance(weight, int | float) and not isinstance(weight, bool):
            evaluated = "auc" in record or "accuracy" in record or (message_type == "evaluate")
            least = 4 * k if evaluated and weight else k
            if weight and weight < least:
                raise ReleaseViolation(f"{name}: num-examples is a small cell")
            if not weight and len(record) > 1 and evaluated:
                raise ReleaseViolation(f"{name}: metrics beside num-examples 0")
    validation = records.get("omopfl.validation")  # federated external validation (issue 14)
    if validation is not None:
        _check_validation(validation.get("result"), k)
    covariates_record = records.get("omopfl.covariates")  # discovery (issue 13b): ids only, never a count
    if covariates_record is not None and set(covariates_record) - {"protocol", "site", "status", "covariate-ids"}:
        raise ReleaseViolation("a covariates reply carries something beside the released ids")
    moments_record = records.get("omopfl.moments")
    noisy = "dp-epsilon" in records.get("omopfl.site", {})  # DP: withholding was decided on the true counts
    if moments_record is not None and not noisy:
        persons = moments_record.get("persons")
        ns = moments_record.get("n", [])
        if not isinstance(persons, int) or persons < k:
            raise ReleaseViolation("statistics over fewer than k persons")
        for n in ns if isinstance(ns, list) else []:
            if n < k or small(persons - n, k):
                raise ReleaseViolation("a released feature's count or missing count is a small cell")


_VALIDATION_COUNTS = ("n", "outcomes", "tp", "fp", "fn", "tn")


def _check_validation(text: Any, k: int) -> None:
    """Every count of a validation result (:mod:`omopfl.plp_metrics`) is 0 or >= k, so is each row's
    persons without the outcome."""
    import json

    try:
        result = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        result = None
    if not isinstance(result, dict):
        raise ReleaseViolation("a validation reply is not a result")

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key in _VALIDATION_COUNTS:
                count = value.get(key)
                if isinstance(count, int | float) and not isinstance(count, bool) and small(count, k):
                    raise ReleaseViolation(f"validation: {key} is a small cell")
            n, outcomes = value.get("n"), value.get("outcomes")
            if isinstance(n, int | float) and isinstance(outcomes, int | float) and small(n - outcomes, k):
                raise ReleaseViolation("validation: persons without the outcome is a small cell")
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(result)


# --------------------------------------------------------------------------------------------
# covariate discovery (issue 13b)
# --------------------------------------------------------------------------------------------


def covariate_ids(persons_per_covariate: Mapping[int, int], k: int, requested: int = 0) -> list[int]:
    """The covariate ids a site may release in a discovery query: those held by at least
    ``max(k, requested)`` of its persons.

    ``k`` is the site's own ``min_cell_count``; ``requested`` is what the coordinator asked for, which can
    only raise the bar (a coordinator asking for fewer persons than the site's k gets the site's k).
    Only the ids leave, never the counts.
    """
    least = max(int(k), int(requested), 1)
    return sorted(int(c) for c, n in persons_per_covariate.items() if int(n) >= least)
