"""Link each person of a cohort to a DICOM image: the newest valid one in the study's imaging window.

:func:`link_images` finds, per person, the ``image_occurrence`` rows (OMOP imaging extension) dated
inside the study window around the person's index date, newest first, or the rows of a site-provided
manifest CSV (:mod:`omopfl.linking.candidates`), and takes the first whose file passes the header
checks of :func:`omopfl.linking.dicom.check_target`.  Pixels are decoded lazily by :class:`LazyImages`,
resized and normalized once, and cached on disk so later epochs never decode again.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from omopfl.config import SiteConfig
from omopfl.db import qualified
from omopfl.errors import ConfigError, DataError
from omopfl.linking.candidates import (
    Candidate,
    as_day,
    candidate_source,
    clean_text,
    cohort_persons,
    first_usable_files,
    manifest_candidates,
    mask_counts,
    require_table,
    window_rows,
)
from omopfl.linking.dicom import check_target, decode_pixels
from omopfl.study import StudyConfig

__all__ = ["CACHE_VERSION", "IMAGE_REPORT_KEYS", "NORMALIZATIONS", "ImageLinks", "LazyImages", "link_images"]

#: Per-image intensity normalizations: ``minmax`` maps the 1st..99th percentile to [0, 1]
#: (clipped); ``zscore`` subtracts the mean and divides by the standard deviation.
NORMALIZATIONS = ("minmax", "zscore")
#: Part of every cache key: bump it when decoding, resizing or normalizing changes.
CACHE_VERSION = "1"

IMAGE_REPORT_KEYS: tuple[str, ...] = (
    "persons",  # persons asked for
    "linked",  # persons with a usable image
    "unlinked",  # persons without one
    "no_candidate",  # persons with no image row in the window
    "candidates",  # image rows in the window (a person may have several)
    "files_checked",  # headers read (the newest passing file ends a person's search)
    "no_path",  # rows without a local path
    "outside_root",  # relative paths that climb out of image_root
    "missing_file",
    "unreadable",  # not a DICOM file (or not readable at all)
    "truncated",  # pixel data shorter than the header announces
    "no_pixels",  # no pixel data element, or no Rows/Columns
    "unsupported_encoding",  # compressed pixel data no installed decoder handles
    "mismatched_patient",  # PatientID != person_id
    "mismatched_study",  # StudyInstanceUID != image_study_uid
    "mismatched_series",  # SeriesInstanceUID != image_series_uid
    "wrong_modality",  # Modality tag not among the study's modalities
    "bad_manifest_rows",  # manifest rows with an unusable person_id or date
    "cache_hits",
    "cache_misses",
    "decoded",
    "decode_failed",
)


class LazyImages:
    """Linked images, decoded on first access and cached on disk.

    ``get(i)`` returns a float32 ``size`` x ``size`` array.  A cache miss decodes the file
    (:func:`omopfl.linking.dicom.decode_pixels`) and writes ``<cache_dir>/<sha256>.npy``, the key covering the
    file's absolute path, byte size and modification time (as seen when it was linked), the
    target size, the normalization and :data:`CACHE_VERSION`; any later access, in this
    process or a later one, loads the cached array instead.  A file that no longer decodes
    raises :class:`DataError` (naming only the position ``i``) and is remembered, not retried.

    The file paths are private to the object; ``repr`` shows counts only.
    """

    def __init__(self, entries: Sequence[tuple[str, int, int]], size: int, cache_dir: Path,
                 normalize: str = "minmax") -> None:
        if normalize not in NORMALIZATIONS:
            raise ConfigError(f"image normalization must be one of {', '.join(NORMALIZATIONS)}")
        self._entries = list(entries)
        self.size = int(size)
        self.normalize = normalize
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.cache_hits = 0
        self.cache_misses = 0
        self.decoded = 0
        self._failed: set[int] = set()

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return (f"LazyImages(n={len(self)}, size={self.size}, normalize={self.normalize!r}, "
                f"cache_hits={self.cache_hits}, cache_misses={self.cache_misses})")

    def _key(self, i: int) -> Path:
        path, size, mtime = self._entries[i]
        text = f"{CACHE_VERSION}|{os.path.abspath(path)}|{size}|{mtime}|{self.size}|{self.normalize}"
        return self.cache_dir / f"{hashlib.sha256(text.encode()).hexdigest()}.npy"

    def get(self, i: int) -> np.ndarray:
        """The ``i``-th linked image as float32 ``(size, size)``.

        Raises
        ------
        IndexError
            ``i`` out of range.
        DataError
            The file could not be decoded (counted in ``decode_failed``).
        """
        if not -len(self) <= i < len(self):
            raise IndexError("image index out of range")
        i = i % len(self)
        if i in self._failed:
            raise DataError(f"linked image {i} could not be decoded")
        target = self._key(i)
        try:
            image = np.load(target, allow_pickle=False)
            if image.shape == (self.size, self.size) and image.dtype == np.float32:
                self.cache_hits += 1
                return image
        except (OSError, ValueError, EOFError):
            pass
        self.cache_misses += 1
        try:
            image = decode_pixels(self._entries[i][0], self.size, self.normalize)
        except Exception:  # decoder errors can carry file names or values: count, never echo
            self._failed.add(i)
            raise DataError(f"linked image {i} could not be decoded") from None
        self.decoded += 1
        partial = target.with_name(f"{target.stem}.{os.getpid()}.tmp.npy")
        try:
            np.save(partial, image, allow_pickle=False)
            os.replace(partial, target)
        except OSError:  # a read-only or full cache disk costs speed, not correctness
            partial.unlink(missing_ok=True)
        return image

    def materialize(self) -> np.ndarray:
        """All images as one float32 array ``(n, size, size)``.

        Images that fail to decode are zeros and ``valid`` is False for them.
        """
        out = np.zeros((len(self), self.size, self.size), dtype=np.float32)
        for i in range(len(self)):
            with contextlib.suppress(DataError):
                out[i] = self.get(i)
        return out

    @property
    def valid(self) -> np.ndarray:
        """Boolean mask: False for images known not to decode."""
        mask = np.ones(len(self), dtype=bool)
        mask[sorted(self._failed)] = False
        return mask

    @property
    def stats(self) -> dict[str, int]:
        return {"cache_hits": self.cache_hits, "cache_misses": self.cache_misses, "decoded": self.decoded,
                "decode_failed": len(self._failed)}


@dataclass
class ImageLinks:
    """Result of :func:`link_images`.

    Attributes
    ----------
    person_ids:
        Linked persons (int64), in the order of the persons frame.
    positions:
        Their row positions in the persons frame (to align with a feature matrix).
    days_from_index:
        Image date minus index date, in days (0 when a manifest has no dates).
    images:
        The pixels, aligned with ``person_ids``.
    counts:
        Linking counts (see :data:`IMAGE_REPORT_KEYS`).
    """

    person_ids: np.ndarray
    positions: np.ndarray
    days_from_index: np.ndarray
    images: LazyImages
    counts: dict[str, int] = field(repr=False)

    def __len__(self) -> int:
        return len(self.person_ids)

    def __repr__(self) -> str:
        return f"ImageLinks(linked={len(self)}, persons={self.counts['persons']}, images={self.images!r})"

    @property
    def report(self) -> dict[str, int]:
        """Counts only (linking plus the live cache counters): safe to show off-site."""
        merged = {**self.counts, **self.images.stats}
        return {key: int(merged.get(key, 0)) for key in IMAGE_REPORT_KEYS}

    def masked_report(self, min_cell_count: int) -> dict[str, Any]:
        """``report`` with counts in ``1 .. min_cell_count - 1`` shown as ``"<N"``."""
        return mask_counts(self.report, min_cell_count)

    def materialize(self, person_ids: Sequence[int] | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Pixels aligned to ``person_ids`` (default: the linked persons), for training.

        Returns
        -------
        pixels, mask
            float32 ``(len(person_ids), size, size)``, zeros where a person has no image or
            the image failed to decode; boolean ``mask`` True where the pixels are real.
        """
        pixels = self.images.materialize()
        valid = self.images.valid
        if person_ids is None:
            return pixels, valid
        wanted = np.asarray(person_ids, dtype=np.int64)
        out = np.zeros((len(wanted), self.images.size, self.images.size), dtype=np.float32)
        mask = np.zeros(len(wanted), dtype=bool)
        row_of = {int(p): k for k, p in enumerate(self.person_ids)}
        for i, person_id in enumerate(wanted):
            k = row_of.get(int(person_id))
            if k is not None and valid[k]:
                out[i], mask[i] = pixels[k], True
        return out, mask


def _image_candidates_db(conn: sa.Connection, site: SiteConfig, ids: np.ndarray, index: np.ndarray,
                         window: tuple[int, int], positions: dict[int, int]) -> Iterator[Candidate]:
    require_table(conn, site, "image_occurrence",
                   "load the OMOP imaging extension or pass an image manifest")
    table = qualified(site.cdm_schema, "image_occurrence")
    select = (
        "SELECT io.person_id, io.image_occurrence_date, io.local_path, io.image_study_uid, io.image_series_uid "
        f"FROM {table} io JOIN p ON io.person_id = p.person_id "
        "WHERE io.image_occurrence_date BETWEEN p.lo AND p.hi "
        "ORDER BY io.person_id, io.image_occurrence_date DESC, io.image_occurrence_id DESC"
    )
    for row in window_rows(conn, select, ids, index, window, f"site {site.name}: image_occurrence"):
        person_id = int(row[0])
        yield Candidate(positions[person_id], person_id, as_day(row[1]), clean_text(row[2]), clean_text(row[3]),
                         clean_text(row[4]))


def link_images(
    conn: sa.Connection | None,
    site: SiteConfig,
    study: StudyConfig,
    persons: pd.DataFrame,
    cache_dir: Path,
    manifest: Path | None = None,
    *,
    normalize: str = "minmax",
) -> ImageLinks:
    """Link each person to the newest valid image in the study's imaging window.

    Parameters
    ----------
    conn:
        Open connection to the site's database (read-only use); may be None with a manifest.
    site:
        The site; relative paths resolve against ``site.image_root``.  A path may be one
        DICOM file or a series folder (the middle slice of the files that pass is used).
    study:
        ``study.imaging`` gives the modalities (checked on the DICOM ``Modality`` tag), the
        output size and the window in days around index.
    persons:
        Columns ``person_id`` (unique) and ``index_date``.
    cache_dir:
        Where decoded, resized, normalized images are cached (stays at the site).
    manifest:
        Optional CSV with columns ``person_id, path`` and optionally ``study_uid``,
        ``series_uid`` (checked against the header when given) and ``date`` (ISO date; when
        present only rows in the window count, newest first; without it later rows count
        as newer).  Relative paths resolve against ``image_root`` (or the manifest's folder
        when the site has none).  Replaces the ``image_occurrence`` query.
    normalize:
        One of :data:`NORMALIZATIONS`.

    Returns
    -------
    ImageLinks
        Linked persons, lazily decoded pixels, and counts by reason.

    Raises
    ------
    ConfigError
        No ``image_root`` and no manifest, or an unknown normalization.
    CdmError
        The CDM has no ``image_occurrence`` table (and no manifest was given).
    DataError
        Malformed ``persons`` or manifest.
    DatabaseError
        The query failed.
    """
    spec = study.imaging
    ids, index = cohort_persons(persons)
    positions = {int(p): k for k, p in enumerate(ids)}
    counts: dict[str, int] = dict.fromkeys(IMAGE_REPORT_KEYS, 0)
    counts["persons"] = len(ids)
    modalities = frozenset(m.strip().upper() for m in spec.modalities)
    if normalize not in NORMALIZATIONS:
        raise ConfigError(f"image normalization must be one of {', '.join(NORMALIZATIONS)}")
    root, candidates = candidate_source(
        kind="image", caller="link_images", site=site, root=site.image_root, conn=conn, manifest=manifest,
        from_manifest=lambda frame: manifest_candidates(frame, positions, index, spec.window, counts),
        from_database=lambda c: _image_candidates_db(c, site, ids, index, spec.window, positions))

    def check(candidate: Candidate, path: Path) -> tuple[str, None] | tuple[None, tuple[str, int, int]]:
        checked = check_target(path, candidate.person_id, candidate.study_uid, candidate.series_uid, modalities)
        if checked.reason is not None or checked.path is None:
            return checked.reason or "missing_file", None
        return None, (str(checked.path), checked.size, checked.mtime_ns)

    linked: list[tuple[int, int, int, tuple[str, int, int]]] = []  # position, person, days, entry

    def accept(candidate: Candidate, entry: tuple[str, int, int]) -> None:
        days = int((candidate.day - index[candidate.position]).astype(int)) if candidate.day is not None else 0
        linked.append((candidate.position, candidate.person_id, days, entry))

    first_usable_files(candidates, root, check, accept, counts, len(ids))
    linked.sort(key=lambda item: item[0])
    images = LazyImages([item[3] for item in linked], spec.size, Path(cache_dir), normalize)
    return ImageLinks(
        person_ids=np.array([item[1] for item in linked], dtype=np.int64),
        positions=np.array([item[0] for item in linked], dtype=np.int64),
        days_from_index=np.array([item[2] for item in linked], dtype=np.int64),
        images=images,
        counts=counts,
    )
