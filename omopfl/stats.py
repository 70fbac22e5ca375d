"""Federated statistics: mergeable moments, global standardization, disclosure control, DP noise.

This module is pure: it imports numpy, pandas and the standard library only (no database,
Flower, torch, DICOM or Great Expectations code), so the server side can use it without
touching anything that reads patient data.

Moments and merging
-------------------
A site summarizes each numeric feature by ``(n, mean, m2)``: the number of non-missing values,
their mean and the sum of squared deviations from that mean (``M2``).  :meth:`Moments.from_array`
computes them in float64 with the corrected two-pass algorithm (mean, then
``M2 = sum(d**2) - sum(d)**2 / n`` with ``d = x - mean``), NaN-aware per feature.  Sites merge with
Chan, Golub and LeVeque's update::

    n = na + nb;  d = mb - ma;  mean = ma + d * nb / n;  M2 = M2a + M2b + d**2 * na * nb / n

which is associative and commutative up to rounding.  The one-pass formula
``sum(x**2) / n - mean**2`` is never used: it loses every significant digit on data with a large
offset (dates as epoch seconds) and can even return a negative variance.

Conventions: a feature without data has ``n == 0``, ``mean == 0.0`` and ``m2 == 0.0``, which is
the identity of the merge, so empty sites and all-missing features never leak NaN into a merge.
:func:`finalize` reports such a feature's mean as NaN, and the standard deviation of every
feature with ``n <= ddof`` as NaN.  ``persons`` counts the rows (one row per person) an aggregate
covers; merging adds it, which assumes that sites hold disjoint sets of persons.

Precision: each site's mean is rounded to float64 before it is sent, and the merge term
``d**2 * na * nb / n`` is first-order sensitive to that rounding.  The merged standard deviation
therefore matches a two-pass computation on the pooled data to a relative error of about
``2 * eps * |mean| / std`` (``eps = 2.2e-16``) in the worst case (sites with very different
means), plus a few ``eps``: below 1e-12 whenever ``std / |mean|`` exceeds about 5e-4.  For dates
as epoch seconds (about 1.7e9) that is a spread of more than about ten days; features with a
huge offset and a tiny spread should be centred before aggregation (e.g. days since the index
date instead of epoch seconds).

Standardization
---------------
:class:`Scaler` holds the global mean and scale.  A feature whose variance cannot be told apart
from rounding error (``var <= n*eps*var + (n*eps*mean)**2``, the error bound of the two-pass
algorithm that scikit-learn's ``StandardScaler`` also uses) gets scale 1.0, as does a feature with
``n <= ddof``; a feature with no data at all gets mean 0.0 and scale 1.0.

Disclosure control
------------------
:func:`suppress` turns a :class:`Moments` into a :class:`Released` and a :class:`LevelCounts` into a
:class:`ReleasedLevels`, the only forms meant to leave a site.  With ``k = min_cell_count``:

* If fewer than ``k`` persons are covered, the whole aggregate is withheld: the record carries the
  feature names and the fact that it was withheld, nothing else (not the person count).
* Moments: a feature with ``n < k`` is withheld; its ``n``, ``mean`` and ``m2`` are not in the
  release at all, only its flag.  Released features carry exact ``n``, ``mean`` and ``m2``.
  So that no small cell can be worked out by differencing, a feature is also withheld when the
  number of persons missing it (``persons - n``) is between 1 and ``k - 1``, and, for a 0/1 feature
  (``binary=`` flags), when the count of ones or of zeros (``mean * n``) is between 1 and ``k - 1``.
* Level counts: within a feature, every level counted fewer than ``k`` times is moved into the
  reserved level :data:`WITHHELD_LEVEL` (its name is not released either).  If that bucket is
  non-empty but smaller than ``k``, the smallest released levels are moved into it as well
  (secondary suppression, smallest count first, ties by level name) until it reaches ``k``, so
  no released count and no difference of released counts within a feature is a small cell.  If
  the feature has fewer than ``k`` non-missing values in total, the whole feature is withheld.

Residual risk, by design not handled here: releases may be differenced against earlier releases
of an overlapping cohort.  Use :func:`noisy_moments` where that matters.

Records (:meth:`Released.to_record`, :meth:`ReleasedLevels.to_record`) are dicts of plain
Python ``int``/``float``/``str`` and lists of them, JSON-safe (no NaN), with flags as 0/1 ints;
the only strings are feature names and, for levels, released level labels.

Differential privacy (optional)
-------------------------------
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
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, overload

import numpy as np

__all__ = [
    "WITHHELD_LEVEL",
    "binary_columns",
    "LevelCounts",
    "Moments",
    "NoiseScales",
    "NoisySums",
    "Released",
    "ReleasedLevels",
    "Scaler",
    "dp_noise_scales",
    "finalize",
    "gaussian_sigma",
    "merge",
    "merge_all",
    "merge_levels",
    "noisy_moments",
    "noisy_sums",
    "suppress",
]

WITHHELD_LEVEL = "__withheld__"
"""Reserved level label that collects the level counts withheld by :func:`suppress`."""

_EPS = float(np.finfo(np.float64).eps)

Mechanism = Literal["analytic", "classic"]


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------


def _names(feature_names: Iterable[str], what: str = "feature_names") -> tuple[str, ...]:
    if isinstance(feature_names, str):
        raise ValueError(f"{what} must be a sequence of names, not one string")
    names = tuple(feature_names)
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{what} must be non-empty strings")
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"{what} has duplicates: {dupes}")
    return names


def _check_count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer")
    return int(value)


def _check_min_cell_count(min_cell_count: int) -> int:
    if isinstance(min_cell_count, bool) or not isinstance(min_cell_count, int | np.integer) or min_cell_count < 1:
        raise ValueError("min_cell_count must be an integer >= 1")
    return int(min_cell_count)


def _vector(values: Any, k: int, what: str, *, integer: bool = False) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.shape[0] != k:
        raise ValueError(f"{what} must be a 1-D array with one entry per feature ({k})")
    if integer:
        if arr.dtype.kind == "b" or arr.dtype.kind not in "iuf":
            if arr.size:
                raise ValueError(f"{what} must hold integers")
            arr = arr.astype(np.int64)
        if arr.dtype.kind == "f" and (not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr))):
            raise ValueError(f"{what} must hold integers")
        out = np.array(arr, dtype=np.int64)
    else:
        if arr.size and arr.dtype.kind not in "iuf":
            raise ValueError(f"{what} must hold numbers")
        out = np.array(arr, dtype=np.float64)
    return out


def _readonly(*arrays: np.ndarray) -> None:
    for arr in arrays:
        arr.setflags(write=False)


def _check_same_features(a: tuple[str, ...], b: tuple[str, ...]) -> None:
    if a == b:
        return
    only_a = [n for n in a if n not in b]
    only_b = [n for n in b if n not in a]
    if only_a or only_b:
        raise ValueError(f"feature names differ: only in first {only_a}, only in second {only_b}")
    raise ValueError(f"feature names are in a different order: {list(a)} vs {list(b)}")


def _as_matrix(x: Any, names: tuple[str, ...]) -> np.ndarray:
    """``x`` as a float64 (rows x features) array with NaN for missing values (not copied if possible)."""
    columns = getattr(x, "columns", None)
    if columns is not None:
        if tuple(str(c) for c in columns) != names:
            _check_same_features(names, tuple(str(c) for c in columns))
        arr = x.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != len(names):
        raise ValueError(f"x must be a 2-D array (rows x features) with {len(names)} columns")
    inf = np.isinf(arr).any(axis=0)
    if inf.any():
        raise ValueError(f"features with infinite values: {[names[j] for j in np.flatnonzero(inf)]}")
    return arr


# --------------------------------------------------------------------------------------------
# moments
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Moments:
    """Per-feature count, mean and sum of squared deviations, mergeable across sites.

    Parameters
    ----------
    n:
        int64 count of non-missing values per feature.
    mean:
        float64 mean of the non-missing values; 0.0 where ``n == 0``.
    m2:
        float64 sum of squared deviations from ``mean``; 0.0 where ``n == 0``; never negative.
    feature_names:
        One unique name per feature, in column order.
    persons:
        Number of persons (rows) the aggregate covers; at least ``max(n)``.

    Notes
    -----
    Arrays are copied and made read-only.  Equality (``==``) is exact, element by element.
    """

    n: np.ndarray
    mean: np.ndarray
    m2: np.ndarray
    feature_names: tuple[str, ...]
    persons: int

    def __post_init__(self) -> None:
        names = _names(self.feature_names)
        k = len(names)
        n = _vector(self.n, k, "n", integer=True)
        mean = _vector(self.mean, k, "mean")
        m2 = _vector(self.m2, k, "m2")
        if np.any(n < 0):
            raise ValueError("n must be non-negative")
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(m2))):
            raise ValueError("mean and m2 must be finite (use n == 0, mean == 0, m2 == 0 for no data)")
        if np.any(m2 < 0):
            raise ValueError("m2 must be non-negative")
        empty = n == 0
        mean[empty] = 0.0
        m2[empty] = 0.0
        persons = _check_count(self.persons, "persons")
        if k and persons < int(n.max()):
            raise ValueError("persons must be at least the largest per-feature count n")
        _readonly(n, mean, m2)
        object.__setattr__(self, "feature_names", names)
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "m2", m2)
        object.__setattr__(self, "persons", persons)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Moments):
            return NotImplemented
        return (
            self.feature_names == other.feature_names
            and self.persons == other.persons
            and np.array_equal(self.n, other.n)
            and np.array_equal(self.mean, other.mean)
            and np.array_equal(self.m2, other.m2)
        )

    __hash__ = None  # type: ignore[assignment]

    @classmethod
    def empty(cls, feature_names: Iterable[str]) -> Moments:
        """Moments of no data: the identity of :func:`merge`."""
        names = _names(feature_names)
        k = len(names)
        return cls(np.zeros(k, np.int64), np.zeros(k), np.zeros(k), names, 0)

    @classmethod
    def from_array(cls, x: Any, feature_names: Iterable[str], persons: int | None = None) -> Moments:
        """Compute moments of a (rows x features) array, two-pass in float64, NaN-aware per feature.

        Parameters
        ----------
        x:
            2-D array-like (or DataFrame whose columns equal ``feature_names``), one row per person;
            NaN (or ``pd.NA``) marks a missing value.  Infinite values raise ``ValueError``.
        feature_names:
            Names of the columns of ``x``.
        persons:
            Number of persons covered; defaults to the number of rows.

        Returns
        -------
        Moments
            A column with no non-missing value gets ``n == 0``, ``mean == 0.0``, ``m2 == 0.0``.
        """
        names = _names(feature_names)
        arr = _as_matrix(x, names)
        k = len(names)
        n = np.zeros(k, np.int64)
        mean = np.zeros(k)
        m2 = np.zeros(k)
        for j in range(k):  # one contiguous column at a time: numpy then sums pairwise
            col = np.ascontiguousarray(arr[:, j])
            values = col[~np.isnan(col)]
            if values.size == 0:
                continue
            count = values.size
            mean0 = values.sum() / count
            dev = values - mean0
            corr = dev.sum()
            n[j] = count
            mean[j] = mean0 + corr / count
            m2[j] = max(float((dev * dev).sum() - corr * corr / count), 0.0)
        rows = arr.shape[0] if persons is None else persons
        return cls(n, mean, m2, names, rows)


def merge(a: Moments, b: Moments) -> Moments:
    """Merge two disjoint aggregates with Chan et al.'s update (see the module docstring).

    Raises
    ------
    ValueError
        If the feature names differ (the message names the mismatch).
    """
    _check_same_features(a.feature_names, b.feature_names)
    na = a.n.astype(np.float64)
    nb = b.n.astype(np.float64)
    n = na + nb
    pos = n > 0
    wa = np.divide(na, n, out=np.zeros_like(n), where=pos)
    wb = np.divide(nb, n, out=np.zeros_like(n), where=pos)
    d = b.mean - a.mean
    # step from the larger side: the correction is then the smaller term
    mean = np.where(na >= nb, a.mean + d * wb, b.mean - d * wa)
    m2 = a.m2 + b.m2 + d * d * na * wb
    return Moments(a.n + b.n, mean, m2, a.feature_names, a.persons + b.persons)


def merge_all(moments: Iterable[Moments], feature_names: Iterable[str] | None = None) -> Moments:
    """Merge any number of aggregates (pairwise tree, so rounding grows like log of the count).

    Parameters
    ----------
    moments:
        The aggregates; all with the same feature names.
    feature_names:
        Needed only when ``moments`` may be empty; the result is then :meth:`Moments.empty`.
    """
    items = list(moments)
    if not items:
        if feature_names is None:
            raise ValueError("merge_all of nothing needs feature_names")
        return Moments.empty(feature_names)
    if feature_names is not None:
        _check_same_features(_names(feature_names), items[0].feature_names)
    while len(items) > 1:
        paired = [merge(items[i], items[i + 1]) for i in range(0, len(items) - 1, 2)]
        if len(items) % 2:
            paired.append(items[-1])
        items = paired
    return items[0]


def finalize(m: Moments, ddof: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation ``sqrt(m2 / (n - ddof))``.

    Returns
    -------
    mean, std:
        float64 arrays; ``mean`` is NaN where ``n == 0`` and ``std`` is NaN where ``n <= ddof``.
    """
    if isinstance(ddof, bool) or not isinstance(ddof, int) or ddof < 0:
        raise ValueError("ddof must be a non-negative integer")
    mean = np.where(m.n > 0, m.mean, np.nan)
    dof = (m.n - ddof).astype(np.float64)
    ok = dof > 0
    var = np.divide(m.m2, dof, out=np.full(dof.shape, np.nan), where=ok)
    return mean, np.sqrt(var)


# --------------------------------------------------------------------------------------------
# scaler
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Scaler:
    """Global standardization ``(x - mean) / scale``, the same at every site.

    Parameters
    ----------
    feature_names:
        One name per feature, in column order.
    mean, scale:
        float64, finite; ``scale > 0``.
    """

    feature_names: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray

    def __post_init__(self) -> None:
        names = _names(self.feature_names)
        mean = _vector(self.mean, len(names), "mean")
        scale = _vector(self.scale, len(names), "scale")
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(scale))):
            raise ValueError("scaler mean and scale must be finite")
        if np.any(scale <= 0):
            raise ValueError("scaler scale must be positive")
        _readonly(mean, scale)
        object.__setattr__(self, "feature_names", names)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "scale", scale)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Scaler):
            return NotImplemented
        return (
            self.feature_names == other.feature_names
            and np.array_equal(self.mean, other.mean)
            and np.array_equal(self.scale, other.scale)
        )

    __hash__ = None  # type: ignore[assignment]

    @classmethod
    def from_moments(cls, m: Moments, ddof: int = 1, eps: float = _EPS) -> Scaler:
        """Scaler from (merged) moments.

        Parameters
        ----------
        m:
            Global moments.
        ddof:
            Delta degrees of freedom of the standard deviation (1: sample std, as ``np.std(ddof=1)``).
        eps:
            Relative rounding unit of the constant-feature test: a feature is constant when
            ``var <= n*eps*var + (n*eps*mean)**2`` (default: float64 machine epsilon, as in
            scikit-learn).  Raise it to treat more features as constant.

        Returns
        -------
        Scaler
            Constant features and features with ``n <= ddof`` get scale 1.0; features with
            ``n == 0`` get mean 0.0 and scale 1.0.
        """
        if not (isinstance(eps, float | int) and eps >= 0 and math.isfinite(eps)):
            raise ValueError("eps must be a finite non-negative number")
        _, std = finalize(m, ddof)
        var = std * std
        nf = m.n.astype(np.float64)
        with np.errstate(invalid="ignore"):
            constant = ~np.isfinite(std) | (var <= nf * eps * var + (nf * eps * m.mean) ** 2)
        scale = np.where(constant, 1.0, std)
        return cls(m.feature_names, np.array(m.mean), scale)

    def _columns(self, x: Any) -> np.ndarray:
        columns = getattr(x, "columns", None)
        if columns is not None:
            _check_same_features(self.feature_names, tuple(str(c) for c in columns))
            x = x.to_numpy(dtype=np.float64, na_value=np.nan)
        arr = np.asarray(x, dtype=np.float64)
        if arr.ndim == 0 or arr.shape[-1] != len(self.feature_names):
            raise ValueError(f"x must have {len(self.feature_names)} columns (last axis)")
        return arr

    def transform(self, x: Any) -> np.ndarray:
        """``(x - mean) / scale`` along the last axis; NaN stays NaN.  Returns a new float64 array."""
        return (self._columns(x) - self.mean) / self.scale

    def inverse_transform(self, x: Any) -> np.ndarray:
        """``x * scale + mean`` along the last axis; the inverse of :meth:`transform` to rounding."""
        return self._columns(x) * self.scale + self.mean

    def to_dict(self) -> dict[str, list[str] | list[float]]:
        """JSON-safe form: ``{"feature_names": [...], "mean": [...], "scale": [...]}``."""
        return {
            "feature_names": list(self.feature_names),
            "mean": [float(v) for v in self.mean],
            "scale": [float(v) for v in self.scale],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Scaler:
        """Inverse of :meth:`to_dict`; ``ValueError`` on missing or extra keys or bad values."""
        keys = {"feature_names", "mean", "scale"}
        if not isinstance(data, Mapping) or set(data) != keys:
            raise ValueError(f"a scaler dict has exactly the keys {sorted(keys)}")
        return cls(tuple(data["feature_names"]), np.asarray(data["mean"]), np.asarray(data["scale"]))


# --------------------------------------------------------------------------------------------
# categorical level counts
# --------------------------------------------------------------------------------------------


def _level_label(value: Any) -> str:
    """Canonical string for a level: integral floats print as integers (8507.0 -> '8507')."""
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    if isinstance(value, np.generic):
        value = value.item()
    return str(value)


def _freeze_counts(counts: Mapping[str, Mapping[str, int]]) -> MappingProxyType:
    frozen: dict[str, MappingProxyType] = {}
    for feature, levels in counts.items():
        inner: dict[str, int] = {}
        for level, count in levels.items():
            if not isinstance(level, str):
                raise ValueError("level labels must be strings")
            inner[level] = _check_count(count, "a level count")
        frozen[feature] = MappingProxyType(dict(sorted(inner.items())))
    return MappingProxyType(frozen)


@dataclass(frozen=True)
class LevelCounts:
    """Per-feature counts of categorical levels: ``counts[feature][level] -> persons``.

    Parameters
    ----------
    counts:
        Mapping in feature order; each inner mapping from level label (str) to count.  Levels with
        count 0 may be present.  Stored read-only, levels sorted by label.
    persons:
        Number of persons (rows) covered; at least each feature's total count.
    """

    counts: Mapping[str, Mapping[str, int]]
    persons: int

    def __post_init__(self) -> None:
        _names(self.counts.keys())
        frozen = _freeze_counts(self.counts)
        persons = _check_count(self.persons, "persons")
        for levels in frozen.values():
            if sum(levels.values()) > persons:
                raise ValueError("persons must be at least each feature's total count")
        object.__setattr__(self, "counts", frozen)
        object.__setattr__(self, "persons", persons)

    __hash__ = None  # type: ignore[assignment]

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Feature names in order."""
        return tuple(self.counts)

    def total(self, feature: str) -> int:
        """Number of non-missing values of ``feature``."""
        return sum(self.counts[feature].values())

    @classmethod
    def empty(cls, feature_names: Iterable[str]) -> LevelCounts:
        """Counts of no data: the identity of :func:`merge_levels`."""
        return cls({name: {} for name in _names(feature_names)}, 0)

    @classmethod
    def from_array(cls, x: Any, feature_names: Iterable[str], persons: int | None = None) -> LevelCounts:
        """Count levels per column of a (rows x features) array or DataFrame.

        Missing values (None, NaN, ``pd.NA``, ``NaT``) are not counted.  Labels are ``str(value)``,
        except that integral floats are written as integers so that a concept id read as
        ``8507.0`` at one site and ``8507`` at another is the same level.
        """
        names = _names(feature_names)
        columns = getattr(x, "columns", None)
        if columns is not None:
            _check_same_features(names, tuple(str(c) for c in columns))
            arr = x.to_numpy(dtype=object)
        else:
            arr = np.asarray(x, dtype=object)
        if arr.ndim != 2 or arr.shape[1] != len(names):
            raise ValueError(f"x must be a 2-D array (rows x features) with {len(names)} columns")
        import pandas as pd  # only here: the wire format (codec) must not pay for pandas

        counts: dict[str, dict[str, int]] = {}
        for j, name in enumerate(names):
            col = arr[:, j]
            present = col[~pd.isna(col)]
            counts[name] = dict(Counter(_level_label(v) for v in present))
        return cls(counts, arr.shape[0] if persons is None else persons)


def merge_levels(a: LevelCounts, b: LevelCounts) -> LevelCounts:
    """Add level counts of two disjoint aggregates (levels are the union; names must match)."""
    _check_same_features(a.feature_names, b.feature_names)
    out: dict[str, dict[str, int]] = {}
    for name in a.feature_names:
        merged = Counter(dict(a.counts[name]))
        merged.update(dict(b.counts[name]))
        out[name] = dict(merged)
    return LevelCounts(out, a.persons + b.persons)


# --------------------------------------------------------------------------------------------
# disclosure control
# --------------------------------------------------------------------------------------------


def _record_flag(value: Any, what: str) -> int:
    if type(value) is not int or value not in (0, 1):
        raise ValueError(f"record field {what!r} must be 0 or 1")
    return value


def _record_list(record: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> list[Any]:
    value = record[key]
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, kind) for v in value):
        raise ValueError(f"record field {key!r} must be a list of {kind}")
    return value


def _check_keys(record: Any, keys: set[str]) -> None:
    if not isinstance(record, Mapping) or set(record) != keys:
        raise ValueError(f"a record has exactly the keys {sorted(keys)}")


@dataclass(frozen=True, eq=False)
class Released:
    """Moments after disclosure control: what may leave a site.

    Parameters
    ----------
    feature_names:
        All features of the study, released or not.
    released:
        Per feature, True if its statistics are released.
    persons:
        Persons covered, or None when the whole aggregate is withheld.
    n, mean, m2:
        Statistics of the released features only, in feature order (length ``sum(released)``).
    """

    feature_names: tuple[str, ...]
    released: tuple[bool, ...]
    persons: int | None
    n: np.ndarray
    mean: np.ndarray
    m2: np.ndarray

    _KEYS = frozenset({"feature_names", "withheld", "persons", "released", "n", "mean", "m2"})

    def __post_init__(self) -> None:
        names = _names(self.feature_names)
        released = tuple(bool(r) for r in self.released)
        if len(released) != len(names):
            raise ValueError("released needs one flag per feature")
        k = sum(released)
        n = _vector(self.n, k, "n", integer=True)
        mean = _vector(self.mean, k, "mean")
        m2 = _vector(self.m2, k, "m2")
        if self.persons is None:
            if k:
                raise ValueError("a withheld aggregate releases no feature")
        else:
            _check_count(self.persons, "persons")
        _readonly(n, mean, m2)
        object.__setattr__(self, "feature_names", names)
        object.__setattr__(self, "released", released)
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "m2", m2)
        # validate the statistics themselves (finite, n >= 0, m2 >= 0, persons >= n)
        self.to_moments()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Released):
            return NotImplemented
        return (
            self.feature_names == other.feature_names
            and self.released == other.released
            and self.persons == other.persons
            and np.array_equal(self.n, other.n)
            and np.array_equal(self.mean, other.mean)
            and np.array_equal(self.m2, other.m2)
        )

    __hash__ = None  # type: ignore[assignment]

    @property
    def withheld(self) -> bool:
        """True when the whole aggregate is withheld (too few persons)."""
        return self.persons is None

    def to_moments(self) -> Moments:
        """Server side: Moments over all features, withheld ones as ``n == 0`` (no contribution)."""
        k = len(self.feature_names)
        idx = np.flatnonzero(np.array(self.released, dtype=bool))
        n = np.zeros(k, np.int64)
        mean = np.zeros(k)
        m2 = np.zeros(k)
        n[idx] = self.n
        mean[idx] = self.mean
        m2[idx] = self.m2
        return Moments(n, mean, m2, self.feature_names, 0 if self.persons is None else self.persons)

    def to_record(self) -> dict[str, Any]:
        """Plain dict for the wire: feature names, 0/1 flags, ints and floats, nothing else.

        Keys: ``feature_names`` (list of str), ``withheld`` (0/1), ``persons`` (int; 0 when
        withheld), ``released`` (list of 0/1, one per feature), and ``n`` (list of int), ``mean``,
        ``m2`` (lists of float) for the released features only, in feature order.
        """
        return {
            "feature_names": list(self.feature_names),
            "withheld": int(self.withheld),
            "persons": 0 if self.persons is None else int(self.persons),
            "released": [int(r) for r in self.released],
            "n": [int(v) for v in self.n],
            "mean": [float(v) for v in self.mean],
            "m2": [float(v) for v in self.m2],
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Released:
        """Inverse of :meth:`to_record`; ``ValueError`` on anything malformed."""
        _check_keys(record, set(cls._KEYS))
        withheld = _record_flag(record["withheld"], "withheld")
        persons = record["persons"]
        if type(persons) is not int:
            raise ValueError("record field 'persons' must be an int")
        released = [_record_flag(v, "released") for v in _record_list(record, "released", int)]
        if withheld and (persons or any(released)):
            raise ValueError("a withheld record carries no persons and no released feature")
        return cls(
            feature_names=tuple(_record_list(record, "feature_names", str)),
            released=tuple(bool(r) for r in released),
            persons=None if withheld else persons,
            n=np.asarray(_record_list(record, "n", int), dtype=np.int64),
            mean=np.asarray(_record_list(record, "mean", (int, float)), dtype=np.float64),
            m2=np.asarray(_record_list(record, "m2", (int, float)), dtype=np.float64),
        )


@dataclass(frozen=True)
class ReleasedLevels:
    """Level counts after disclosure control: what may leave a site.

    Parameters
    ----------
    feature_names:
        All categorical features of the study, released or not.
    released:
        Per feature, True if its level counts are released.
    persons:
        Persons covered, or None when the whole aggregate is withheld.
    counts:
        Level counts of the released features only; may contain :data:`WITHHELD_LEVEL`.
    """

    feature_names: tuple[str, ...]
    released: tuple[bool, ...]
    persons: int | None
    counts: Mapping[str, Mapping[str, int]]

    _KEYS = frozenset({"feature_names", "withheld", "persons", "released", "level_feature", "levels", "counts"})

    def __post_init__(self) -> None:
        names = _names(self.feature_names)
        released = tuple(bool(r) for r in self.released)
        if len(released) != len(names):
            raise ValueError("released needs one flag per feature")
        expected = tuple(name for name, r in zip(names, released, strict=True) if r)
        if tuple(self.counts) != expected:
            raise ValueError("counts must hold exactly the released features, in feature order")
        if self.persons is None:
            if expected:
                raise ValueError("a withheld aggregate releases no feature")
        else:
            _check_count(self.persons, "persons")
        object.__setattr__(self, "feature_names", names)
        object.__setattr__(self, "released", released)
        object.__setattr__(self, "counts", _freeze_counts(self.counts))
        self.to_level_counts()

    __hash__ = None  # type: ignore[assignment]

    @property
    def withheld(self) -> bool:
        """True when the whole aggregate is withheld (too few persons)."""
        return self.persons is None

    def to_level_counts(self) -> LevelCounts:
        """Server side: LevelCounts over all features, withheld ones without levels."""
        counts = {name: dict(self.counts.get(name, {})) for name in self.feature_names}
        return LevelCounts(counts, 0 if self.persons is None else self.persons)

    def to_record(self) -> dict[str, Any]:
        """Plain dict for the wire, flat lists only.

        Keys: ``feature_names``, ``withheld`` (0/1), ``persons`` (0 when withheld), ``released``
        (0/1 per feature) and three parallel lists, one entry per released level:
        ``level_feature`` (index into ``feature_names``), ``levels`` (label) and ``counts`` (int).
        """
        level_feature: list[int] = []
        levels: list[str] = []
        counts: list[int] = []
        for j, name in enumerate(self.feature_names):
            for level, count in self.counts.get(name, {}).items():
                level_feature.append(j)
                levels.append(level)
                counts.append(int(count))
        return {
            "feature_names": list(self.feature_names),
            "withheld": int(self.withheld),
            "persons": 0 if self.persons is None else int(self.persons),
            "released": [int(r) for r in self.released],
            "level_feature": level_feature,
            "levels": levels,
            "counts": counts,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ReleasedLevels:
        """Inverse of :meth:`to_record`; ``ValueError`` on anything malformed."""
        _check_keys(record, set(cls._KEYS))
        withheld = _record_flag(record["withheld"], "withheld")
        persons = record["persons"]
        if type(persons) is not int:
            raise ValueError("record field 'persons' must be an int")
        names = _record_list(record, "feature_names", str)
        released = [_record_flag(v, "released") for v in _record_list(record, "released", int)]
        if withheld and (persons or any(released)):
            raise ValueError("a withheld record carries no persons and no released feature")
        if len(released) != len(names):
            raise ValueError("released needs one flag per feature")
        level_feature = _record_list(record, "level_feature", int)
        levels = _record_list(record, "levels", str)
        counts = _record_list(record, "counts", int)
        if not len(level_feature) == len(levels) == len(counts):
            raise ValueError("level_feature, levels and counts must have the same length")
        out: dict[str, dict[str, int]] = {name: {} for name, r in zip(names, released, strict=True) if r}
        for j, level, count in zip(level_feature, levels, counts, strict=True):
            if not 0 <= j < len(names) or not released[j]:
                raise ValueError("level_feature must point at a released feature")
            if level in out[names[j]]:
                raise ValueError("a level appears twice for one feature")
            out[names[j]][level] = count
        return cls(tuple(names), tuple(bool(r) for r in released), None if withheld else persons, out)


def _suppress_levels(levels: Mapping[str, int], k: int) -> dict[str, int] | None:
    """Released level counts of one feature, or None if the feature is withheld."""
    if WITHHELD_LEVEL in levels:
        raise ValueError(f"level label {WITHHELD_LEVEL!r} is reserved")
    kept = {level: c for level, c in levels.items() if c >= k}
    bucket = sum(c for level, c in levels.items() if 0 < c < k)
    if bucket:
        for level in sorted(kept, key=lambda lv: (kept[lv], lv)):
            if bucket >= k:
                break
            bucket += kept.pop(level)
        if bucket < k:
            return None
        kept[WITHHELD_LEVEL] = bucket
    if sum(kept.values()) < k:
        return None
    return kept


@overload
def suppress(m: Moments, min_cell_count: int, *, binary: Sequence[bool] | None = None) -> Released: ...


@overload
def suppress(m: LevelCounts, min_cell_count: int) -> ReleasedLevels: ...


def binary_columns(x: np.ndarray) -> tuple[bool, ...]:
    """Per column: do all non-missing values lie in {0, 1}?  (Then mean * n is a count of persons.)"""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError("binary_columns takes a 2-D array (rows x features)")
    finite = ~np.isnan(x)
    return tuple(bool(np.all((x[finite[:, j], j] == 0) | (x[finite[:, j], j] == 1))) for j in range(x.shape[1]))


def suppress(
    m: Moments | LevelCounts, min_cell_count: int, *, binary: Sequence[bool] | None = None
) -> Released | ReleasedLevels:
    """Apply minimum-cell-count disclosure control (rules in the module docstring).

    Parameters
    ----------
    m:
        A site's :class:`Moments` or :class:`LevelCounts`.
    min_cell_count:
        Smallest number of persons any released statistic may cover (>= 1).
    binary:
        For Moments: which features are 0/1 (see :func:`binary_columns`).  Their mean times ``n``
        is a count of persons, so both that count and ``n`` minus it must be 0 or at least ``k``.

    Returns
    -------
    Released or ReleasedLevels
        Holds only the statistics that may leave the site.
    """
    k = _check_min_cell_count(min_cell_count)
    if isinstance(m, Moments):
        if m.persons < k:
            return Released(m.feature_names, (False,) * len(m.feature_names), None, [], [], [])
        keep = m.n >= k
        # Differencing: persons - n is the number of persons missing a feature.
        missing = m.persons - m.n
        keep &= (missing == 0) | (missing >= k)
        if binary is not None:
            if len(binary) != len(m.feature_names):
                raise ValueError("suppress: binary must have one flag per feature")
            ones = np.rint(m.mean * m.n)
            zeros = m.n - ones
            small = ((ones > 0) & (ones < k)) | ((zeros > 0) & (zeros < k))
            keep &= ~(np.asarray(binary, dtype=bool) & small)
        return Released(m.feature_names, tuple(bool(v) for v in keep), m.persons, m.n[keep], m.mean[keep], m.m2[keep])
    if isinstance(m, LevelCounts):
        names = m.feature_names
        if m.persons < k:
            return ReleasedLevels(names, (False,) * len(names), None, {})
        out = {name: _suppress_levels(m.counts[name], k) for name in names}
        released = tuple(out[name] is not None for name in names)
        counts = {name: levels for name, levels in out.items() if levels is not None}
        return ReleasedLevels(names, released, m.persons, counts)
    raise TypeError("suppress takes Moments or LevelCounts")


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
