"""Small-cell suppression: what of a site's Moments may leave it (:class:`Released`).

Pure (numpy and the standard library).  The full release rule over every reply is
:mod:`omopfl.release`; this module applies it to moments.

Disclosure control
------------------
:func:`suppress` turns a :class:`Moments` into a :class:`Released`, the only form meant to leave a
site.  With ``k = min_cell_count``:

* If fewer than ``k`` persons are covered, the whole aggregate is withheld: the record carries the
  feature names and the fact that it was withheld, nothing else (not the person count).
* Moments: a feature with ``n < k`` is withheld; its ``n``, ``mean`` and ``m2`` are not in the
  release at all, only its flag.  Released features carry exact ``n``, ``mean`` and ``m2``.
  So that no small cell can be worked out by differencing, a feature is also withheld when the
  number of persons missing it (``persons - n``) is between 1 and ``k - 1``, and, for a 0/1 feature
  (``binary=`` flags), when the count of ones or of zeros (``mean * n``) is between 1 and ``k - 1``.

Residual risk, by design not handled here: releases may be differenced against earlier releases
of an overlapping cohort.  Use :func:`omopfl.moment_noise.noisy_moments` where that matters.

Records (:meth:`Released.to_record`) are dicts of plain Python ``int``/``float``/``str`` and lists
of them, JSON-safe (no NaN), with flags as 0/1 ints; the only strings are feature names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from omopfl.moments import Moments, _check_count, _names, _readonly, _vector

__all__ = ["Released", "binary_columns", "suppress"]


def _check_min_cell_count(min_cell_count: int) -> int:
    if isinstance(min_cell_count, bool) or not isinstance(min_cell_count, int | np.integer) or min_cell_count < 1:
        raise ValueError("min_cell_count must be an integer >= 1")
    return int(min_cell_count)



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


def binary_columns(x: np.ndarray) -> tuple[bool, ...]:
    """Per column: do all non-missing values lie in {0, 1}?  (Then mean * n is a count of persons.)"""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError("binary_columns takes a 2-D array (rows x features)")
    finite = ~np.isnan(x)
    return tuple(bool(np.all((x[finite[:, j], j] == 0) | (x[finite[:, j], j] == 1))) for j in range(x.shape[1]))


def suppress(
    m: Moments, min_cell_count: int, *, binary: Sequence[bool] | None = None
) -> Released:
    """Apply minimum-cell-count disclosure control (rules in the module docstring).

    Parameters
    ----------
    m:
        A site's :class:`Moments`.
    min_cell_count:
        Smallest number of persons any released statistic may cover (>= 1).
    binary:
        Which features are 0/1 (see :func:`binary_columns`).  Their mean times ``n``
        is a count of persons, so both that count and ``n`` minus it must be 0 or at least ``k``.

    Returns
    -------
    Released
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
    raise TypeError("suppress takes Moments")
