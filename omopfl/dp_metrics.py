"""Differential privacy on released evaluation metrics: noise on the confusion-matrix cells at the site.

When the approved study sets ``[privacy] metrics_epsilon``, a site's evaluation (an ``evaluate`` reply or
the evaluation a ``train`` reply carries) is released as follows:

1. the release rule first (:func:`omopfl.release.evaluation`'s test on the true cells: every cell of the
   confusion matrix at the study's threshold at least ``k``, else withheld, nothing spent);
2. each cell (TP, FP, FN, TN) gets independent **discrete Laplace** (two-sided geometric) noise with
   parameter ``exp(-epsilon)``: adding or removing one person changes exactly one cell by 1 (L1
   sensitivity 1), so the four noisy cells together are ``epsilon``-DP (pure DP, ``delta = 0``).  Integer
   noise on integer counts has none of the floating-point weaknesses of a continuous Laplace sampler
   (Mironov 2012); the generator is numpy's PCG64 seeded from the operating system's entropy;
3. the released numbers are computed from the noisy cells only (post-processing keeps the guarantee):
   ``num-examples`` = their sum, ``accuracy``, ``f1``, ``kappa``, rounded to
   :data:`omopfl.release.METRIC_DECIMALS`.  ``auc`` and ``loss`` are not functions of the cells and are not
   released under metrics DP;
4. if a noisy cell is below ``k`` the evaluation is withheld too (so every released number still
   implies cells of at least ``k``, now of the noisy matrix); the epsilon is spent all the same.

Each release charges ``epsilon`` to the study's budget ledger (:mod:`omopfl.budget`, basic composition
beside the statistics' and DP-SGD's epsilons); once it would exceed the limit the site refuses
(``budget_spent``).  Pure epsilon-DP composes additively, so no accountant is needed for this part; the
ledger's total with DP-SGD's RDP steps is computed by Opacus's accountant as before.

Pure functions (numpy only).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["discrete_laplace", "noisy_cells", "metrics_from_cells", "noisy_evaluation", "NOISY_METRICS"]

NOISY_METRICS = ("accuracy", "f1", "kappa")
"""The metrics released under metrics DP (functions of the confusion matrix)."""


def _rng(rng: np.random.Generator | None) -> np.random.Generator:
    return rng if rng is not None else np.random.default_rng()  # seeded from the OS's entropy


def discrete_laplace(epsilon: float, size: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """``size`` draws of the discrete Laplace distribution ``P(z) ∝ exp(-epsilon |z|)`` (integers).

    The difference of two i.i.d. geometric variables with success probability ``1 - exp(-epsilon)``;
    variance ``2 e^{-epsilon} / (1 - e^{-epsilon})^2``.
    """
    if not (isinstance(epsilon, int | float) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a positive finite number, got {epsilon!r}")
    g = _rng(rng)
    p = -math.expm1(-float(epsilon))  # 1 - exp(-epsilon), accurate for small epsilon
    return (g.geometric(p, size) - g.geometric(p, size)).astype(np.int64)


def noisy_cells(cells: tuple[int, int, int, int], epsilon: float,
                rng: np.random.Generator | None = None) -> tuple[int, int, int, int]:
    """(TP, FP, FN, TN) plus independent discrete Laplace noise: ``epsilon``-DP for the whole matrix."""
    noise = discrete_laplace(epsilon, 4, rng)
    tp, fp, fn, tn = (int(c) + int(z) for c, z in zip(cells, noise, strict=True))
    return tp, fp, fn, tn


def metrics_from_cells(cells: tuple[int, int, int, int]) -> dict[str, float]:
    """``n``, ``accuracy``, ``f1`` and Cohen's ``kappa`` of a confusion matrix (cells all positive)."""
    tp, fp, fn, tn = (float(c) for c in cells)
    n = tp + fp + fn + tn
    accuracy = (tp + tn) / n
    f1 = 2 * tp / (2 * tp + fp + fn)
    expected = ((tp + fp) * (tp + fn) + (fn + tn) * (fp + tn)) / (n * n)
    kappa = (accuracy - expected) / (1 - expected) if expected < 1 else 0.0
    return {"n": int(n), "accuracy": accuracy, "f1": f1, "kappa": kappa}


def noisy_evaluation(y_true: Any, y_prob: Any, k: int, threshold: float, epsilon: float,
                     rng: np.random.Generator | None = None) -> tuple[dict[str, float] | None, bool, tuple[int, ...]]:
    """``(released metrics or None, epsilon spent?, the noisy cells)`` (module docstring).

    The noisy cells are returned for the site's own checks and tests; they never leave the site.
    """
    from omopfl.release import METRIC_DECIMALS, confusion

    cells = confusion(y_true, y_prob, threshold)
    if min(cells) < k:  # the release rule on the true cells: withheld, nothing drawn, nothing spent
        return None, False, ()
    noisy = noisy_cells(cells, epsilon, rng)
    if min(noisy) < k:
        return None, True, noisy
    metrics = metrics_from_cells(noisy)
    out: dict[str, float] = {"n": int(metrics["n"])}
    for key in NOISY_METRICS:
        out[key] = round(float(metrics[key]), METRIC_DECIMALS)
    return out, True, noisy
