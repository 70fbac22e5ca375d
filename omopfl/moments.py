"""Mergeable moments and global standardization: Moments(n, mean, m2), the Chan merge, Scaler.

This module is pure: it imports numpy and the standard library only (no database, Flower, torch,
DICOM or Great Expectations code), so the server side can use it without touching anything that
reads patient data.  Disclosure control of moments is :mod:`omopfl.suppression`; differentially
private moments are :mod:`omopfl.moment_noise`.

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
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Moments", "Scaler", "finalize", "merge", "merge_all"]

_EPS = float(np.finfo(np.float64).eps)


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
