"""Differential privacy on moments: the Gaussian mechanism over clipped sums (:func:`noisy_moments`).

Pure (numpy and the standard library).  DP-SGD for training updates is :mod:`omopfl.dp`.

:func:`noisy_moments` releases moments with the Gaussian mechanism.  It takes the raw values, not
finished :class:`Moments`: the sensitivity bound holds only if values are clipped before they are
aggregated, so there is deliberately no function that adds noise to existing Moments.

* Neighbouring datasets differ by adding or removing one person (one row of ``x``).
* Each feature ``j`` has public bounds ``[lo_j, hi_j]``, fixed in advance and never derived from
  the data; values are clipped to them.  Let ``c_j = (lo_j + hi_j) / 2`` and
  ``r_j = (hi_j - lo_j) / 2``.
* Released quantities, grouped in three blocks: counts (``persons`` and every ``n_j``), first sums
  ``S1_j = sum(x - c_j)`` and second sums ``S2_j = sum((x - c_j)**2)`` over non-missing clipped
  values.  One person changes a count by at most 1, ``S1_j`` by at most ``r_j`` and ``S2_j`` by at
  most ``r_j**2``.
* Budget split: weights ``(w_count, w_s1, w_s2)`` (default one third each, summing to 1) share the
  squared L2 sensitivity of one joint Gaussian mechanism.  Component ``i`` of block ``q``, which has
  ``k_q`` components and per-person sensitivity ``Delta_i``, gets independent noise
  ``N(0, sigma_i**2)`` with ``sigma_i = Delta_i * sqrt(k_q / w_q) * sigma_1``.  Dividing every
  component by its ``sigma_i / sigma_1`` gives a vector of L2 sensitivity exactly 1 with noise
  ``sigma_1`` per coordinate, so the release is a single Gaussian mechanism (no composition loss).
* ``sigma_1`` for sensitivity 1: ``mechanism="analytic"`` (default) is the analytic Gaussian
  mechanism of Balle and Wang (ICML 2018), the smallest sigma with
  ``Phi(1/(2 sigma) - eps sigma) - exp(eps) Phi(-1/(2 sigma) - eps sigma) <= delta``, valid for every
  ``eps > 0``; ``mechanism="classic"`` is ``sigma_1 = sqrt(2 ln(1.25 / delta)) / eps`` (Dwork and
  Roth, Theorem A.1), valid only for ``0 < eps < 1``.  See :func:`gaussian_sigma` and
  :func:`dp_noise_scales`.
* Post-processing (free under DP): counts are rounded and clipped at 0 (``persons`` at least the
  largest ``n_j``); ``mean_j = c_j + S1_j / n_j`` is clipped to ``[lo_j, hi_j]``;
  ``M2_j = S2_j - S1_j**2 / n_j`` is clipped to ``[0, n_j * r_j**2]``, so ``M2 >= 0`` and
  ``n >= 0`` always.  Suppressing the noisy moments afterwards is post-processing too.

Guarantee: per site and per call, the released ``Moments`` are (epsilon, delta)-differentially
private with respect to adding or removing one person, for the clipped data and the given public
bounds.  Repeated releases over the same persons compose (their epsilons and deltas add under
basic composition).  Noise comes from ``numpy.random.Generator.normal`` in floating point, which
is not hardened against floating-point side-channel attacks; pass a generator seeded from OS
entropy (``numpy.random.default_rng()``) in production.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from omopfl.moments import Moments, _as_matrix, _names

__all__ = ["Mechanism", "NoiseScales", "NoisySums", "dp_noise_scales", "gaussian_sigma", "noisy_moments", "noisy_sums"]

Mechanism = Literal["analytic", "classic"]


# --------------------------------------------------------------------------------------------
# differential privacy
# --------------------------------------------------------------------------------------------


def _log_ndtr(x: float) -> float:
    """log of the standard normal CDF, accurate far into the lower tail."""
    if x > -30.0:
        return math.log(0.5 * math.erfc(-x / math.sqrt(2.0)))
    # asymptotic series: Phi(x) ~ phi(x)/|x| * (1 - 1/x^2 + 3/x^4 - 15/x^6 + ...)
    x2 = x * x
    term, series = 1.0, 1.0
    for i in range(1, 8):
        term *= -(2 * i - 1) / x2
        series += term
    return -0.5 * x2 - math.log(-x) - 0.5 * math.log(2.0 * math.pi) + math.log(series)


def _analytic_delta(sigma: float, epsilon: float) -> float:
    """Smallest delta for which N(0, sigma^2) noise on a sensitivity-1 query is (epsilon, delta)-DP."""
    a = 0.5 / sigma - epsilon * sigma
    b = -0.5 / sigma - epsilon * sigma
    return math.exp(_log_ndtr(a)) - math.exp(epsilon + _log_ndtr(b))


def gaussian_sigma(
    epsilon: float, delta: float, sensitivity: float = 1.0, *, mechanism: Mechanism = "analytic"
) -> float:
    """Noise standard deviation of the Gaussian mechanism for an L2 sensitivity.

    Parameters
    ----------
    epsilon, delta:
        Privacy parameters; ``epsilon > 0`` and ``0 < delta < 1``.
    sensitivity:
        L2 sensitivity of the released vector (> 0).
    mechanism:
        ``"analytic"``: the smallest sigma satisfying Balle and Wang's exact condition
        ``Phi(D/(2s) - eps s/D) - exp(eps) Phi(-D/(2s) - eps s/D) <= delta`` (any ``epsilon > 0``),
        found by bisection to a relative 1e-12.  ``"classic"``:
        ``sqrt(2 ln(1.25/delta)) * sensitivity / epsilon``, valid only for ``epsilon < 1``.
    """
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError("epsilon must be a positive finite number")
    if not (0.0 < delta < 1.0):
        raise ValueError("delta must be in (0, 1)")
    if not (math.isfinite(sensitivity) and sensitivity > 0):
        raise ValueError("sensitivity must be a positive finite number")
    if mechanism == "classic":
        if epsilon >= 1.0:
            raise ValueError("the classic Gaussian mechanism needs epsilon < 1; use mechanism='analytic'")
        return math.sqrt(2.0 * math.log(1.25 / delta)) * sensitivity / epsilon
    if mechanism != "analytic":
        raise ValueError("mechanism must be 'analytic' or 'classic'")
    hi = 1.0
    while _analytic_delta(hi, epsilon) > delta:
        hi *= 2.0
    lo = hi / 2.0
    while _analytic_delta(lo, epsilon) <= delta and lo > 1e-300:
        hi, lo = lo, lo / 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _analytic_delta(mid, epsilon) > delta:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return hi * sensitivity


def _bounds(bounds: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    arr = np.asarray(bounds, dtype=np.float64)
    if arr.shape != (k, 2):
        raise ValueError(f"bounds must hold one (low, high) pair per feature ({k})")
    lo, hi = arr[:, 0].copy(), arr[:, 1].copy()
    if not (np.all(np.isfinite(arr)) and np.all(lo < hi)):
        raise ValueError("bounds must be finite with low < high")
    return lo, hi


def _split(split: Sequence[float]) -> tuple[float, float, float]:
    w = tuple(float(v) for v in split)
    if len(w) != 3 or not all(math.isfinite(v) and v > 0 for v in w) or abs(sum(w) - 1.0) > 1e-9:
        raise ValueError("split must be three positive weights (count, sum, sum of squares) summing to 1")
    return w  # type: ignore[return-value]


@dataclass(frozen=True, eq=False)
class NoiseScales:
    """Standard deviations of the Gaussian noise on each released component.

    Attributes
    ----------
    persons:
        On the person count.
    n, s1, s2:
        Per feature, on the count, the first and the second centred sum.
    sigma_1:
        The unit sigma of :func:`gaussian_sigma` for sensitivity 1.
    """

    persons: float
    n: np.ndarray
    s1: np.ndarray
    s2: np.ndarray
    sigma_1: float


def dp_noise_scales(
    bounds: Any,
    epsilon: float,
    delta: float,
    *,
    split: Sequence[float] = (1 / 3, 1 / 3, 1 / 3),
    mechanism: Mechanism = "analytic",
) -> NoiseScales:
    """Per-component noise sigmas of :func:`noisy_sums` (formula in the module docstring).

    With ``F`` features and ``r_j = (hi_j - lo_j) / 2``: counts (``F + 1`` components, sensitivity
    1) get ``sigma_1 * sqrt((F + 1) / w_count)``; ``S1_j`` gets ``r_j * sigma_1 * sqrt(F / w_s1)``;
    ``S2_j`` gets ``r_j**2 * sigma_1 * sqrt(F / w_s2)``.
    """
    arr = np.asarray(bounds, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError("bounds must hold one (low, high) pair per feature")
    k = arr.shape[0]
    lo, hi = _bounds(arr, k)
    w_count, w_s1, w_s2 = _split(split)
    sigma_1 = gaussian_sigma(epsilon, delta, 1.0, mechanism=mechanism)
    r = (hi - lo) / 2.0
    count_sigma = sigma_1 * math.sqrt((k + 1) / w_count)
    k1 = max(k, 1)
    return NoiseScales(
        persons=count_sigma,
        n=np.full(k, count_sigma),
        s1=r * sigma_1 * math.sqrt(k1 / w_s1),
        s2=r * r * sigma_1 * math.sqrt(k1 / w_s2),
        sigma_1=sigma_1,
    )


@dataclass(frozen=True, eq=False)
class NoisySums:
    """Raw Gaussian-mechanism output before post-processing (floats, may be negative).

    Attributes
    ----------
    feature_names:
        Feature order.
    persons, n, s1, s2:
        Noisy person count, counts, and sums of ``x - center`` and ``(x - center)**2``.
    low, high:
        The public clipping bounds.
    """

    feature_names: tuple[str, ...]
    persons: float
    n: np.ndarray
    s1: np.ndarray
    s2: np.ndarray
    low: np.ndarray
    high: np.ndarray

    def to_moments(self) -> Moments:
        """Post-process into valid Moments: counts rounded and >= 0, mean within bounds, M2 in [0, n r^2]."""
        center = (self.low + self.high) / 2.0
        r = (self.high - self.low) / 2.0
        n = np.maximum(np.rint(self.n), 0.0).astype(np.int64)
        nf = n.astype(np.float64)
        has = n > 0
        denom = np.where(has, nf, 1.0)
        mean = np.where(has, np.clip(center + self.s1 / denom, self.low, self.high), 0.0)
        m2 = np.where(has, np.clip(self.s2 - self.s1 * self.s1 / denom, 0.0, nf * r * r), 0.0)
        persons = max(int(max(np.rint(self.persons), 0.0)), int(n.max()) if n.size else 0)
        return Moments(n, mean, m2, self.feature_names, persons)


def noisy_sums(
    x: Any,
    feature_names: Iterable[str],
    bounds: Any,
    epsilon: float,
    delta: float,
    rng: np.random.Generator,
    *,
    split: Sequence[float] = (1 / 3, 1 / 3, 1 / 3),
    mechanism: Mechanism = "analytic",
) -> NoisySums:
    """Gaussian mechanism on the clipped counts and centred sums (see :func:`noisy_moments`)."""
    if not isinstance(rng, np.random.Generator):
        raise ValueError("rng must be a numpy.random.Generator")
    names = _names(feature_names)
    arr = _as_matrix(x, names)
    lo, hi = _bounds(bounds, len(names))
    scales = dp_noise_scales(np.stack([lo, hi], axis=1), epsilon, delta, split=split, mechanism=mechanism)
    mask = ~np.isnan(arr)
    centred = np.where(mask, np.clip(arr, lo, hi) - (lo + hi) / 2.0, 0.0)
    k = len(names)
    return NoisySums(
        feature_names=names,
        persons=float(arr.shape[0] + rng.normal(0.0, scales.persons)),
        n=mask.sum(axis=0) + rng.normal(0.0, scales.n, size=k),
        s1=centred.sum(axis=0) + rng.normal(0.0, scales.s1, size=k),
        s2=(centred * centred).sum(axis=0) + rng.normal(0.0, scales.s2, size=k),
        low=lo,
        high=hi,
    )


def noisy_moments(
    x: Any,
    feature_names: Iterable[str],
    bounds: Any,
    epsilon: float,
    delta: float,
    rng: np.random.Generator,
    *,
    split: Sequence[float] = (1 / 3, 1 / 3, 1 / 3),
    mechanism: Mechanism = "analytic",
) -> Moments:
    """(epsilon, delta)-differentially private Moments of raw data (mechanism in the module docstring).

    Parameters
    ----------
    x:
        (rows x features) array-like, one row per person, NaN for missing.
    feature_names:
        Column names.
    bounds:
        Public ``(low, high)`` per feature, shape ``(F, 2)``; values are clipped to them.
    epsilon, delta:
        Privacy budget of this one release (``epsilon > 0``, ``0 < delta < 1``).
    rng:
        Source of noise; ``numpy.random.default_rng()`` (OS entropy) in production.
    split:
        Weights of the budget on (counts, first sums, second sums); positive, summing to 1.
    mechanism:
        ``"analytic"`` (default, any epsilon) or ``"classic"`` (epsilon < 1).

    Returns
    -------
    Moments
        Noisy, post-processed: ``n >= 0``, ``m2 >= 0``, means within the bounds.
    """
    sums = noisy_sums(x, feature_names, bounds, epsilon, delta, rng, split=split, mechanism=mechanism)
    return sums.to_moments()
