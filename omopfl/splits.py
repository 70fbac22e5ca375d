"""A test set fixed by the study (``[split]``): by a cohort, or by a keyed hash of each person's id.

``[training] test_fraction``/``seed`` (the default, ``method = "random"``) draw a stratified random
split of the prepared rows at training time (:func:`omopfl.models.split`): it depends on the rows'
order and count, so a site re-prepared after new data arrived gets another test set.  A study that
fixes its test set writes ``[split]`` instead:

``method = "cohort"`` (``test_cohort = "test.json"`` / ``{file, id}`` / ``{cohort_id = N}``)
    the test set is the persons of the target cohort who are in the test cohort (by ``subject_id``);
``method = "hash"`` (``test_fraction``, ``seed``)
    a person is in the test set iff :func:`hash_unit` of (seed, person_id) is below the fraction:
    the same person is in the test set at every re-preparation, whatever the row order, and adding
    persons never moves anyone else.

``omopfl prepare`` writes the mask (``test_mask.npy``, one bool per row, True = test) beside the
prepared rows; the site's training handlers use it, never a split a message asks for.  The
mask is part of the prepared dataset, whose dataset hash (:meth:`omopfl.study.StudyConfig.dataset_hash`)
covers ``[split]``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

__all__ = ["METHODS", "TEST_MASK_FILE", "hash_unit", "hash_test_mask", "rows_from_mask"]

METHODS = ("random", "hash", "cohort")
TEST_MASK_FILE = "test_mask.npy"
_SCALE = float(2**64)


def hash_unit(seed: int, person_id: int) -> float:
    """A number in [0, 1) fixed by (seed, person_id): BLAKE2b-64 of the decimal person id keyed with
    the seed's 8 big-endian bytes, read as an unsigned integer over 2**64 (reproducible elsewhere)."""
    digest = hashlib.blake2b(str(int(person_id)).encode(), digest_size=8,
                             key=int(seed).to_bytes(8, "big")).digest()
    return int.from_bytes(digest, "big") / _SCALE


def hash_test_mask(person_ids: Iterable[int], test_fraction: float, seed: int) -> np.ndarray:
    """True for the persons in the hash split's test set (one bool per id, in the ids' order)."""
    return np.fromiter((hash_unit(seed, p) < test_fraction for p in person_ids), dtype=bool)


def rows_from_mask(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows) as sorted int64 indices, like :func:`omopfl.models.split`."""
    mask = np.asarray(mask, dtype=bool).reshape(-1)
    return np.flatnonzero(~mask).astype(np.int64), np.flatnonzero(mask).astype(np.int64)
