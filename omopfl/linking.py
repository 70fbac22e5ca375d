"""Link each person of a cohort to a DICOM image and an omics expression profile.

This is the only module (besides the synthetic generator) that imports pydicom.

Images
    :func:`link_images` finds, per person, the ``image_occurrence`` rows (OMOP imaging
    extension) dated inside the study window around the person's index date, newest first,
    or the rows of a site-provided manifest CSV.  Each candidate file's *header* is read
    (``stop_before_pixels``) and checked against the CDM: ``PatientID == str(person_id)``,
    ``StudyInstanceUID`` and ``SeriesInstanceUID`` equal to the row's UIDs, ``Modality`` one
    of the study's modalities (the CDM's ``modality_concept_id`` is not trusted), and the
    pixel data element is present, complete and decodable.  The first candidate that passes
    is the person's image.  A path may name a series folder: its middle slice (by
    ``InstanceNumber``) among the files that pass is used.  Pixels are decoded lazily by
    :class:`LazyImages`, resized and normalized once, and cached on disk so later epochs
    never decode again.

Omics
    :func:`link_omics` finds, per person, the newest specimen dated in
    :data:`OMICS_WINDOW` (``[-365, 0]`` days around index) whose file (``specimen_source_id``
    under the site's ``omics_root``, or a manifest row) reads as a ``gene,value`` table, and
    returns one expression vector over the study's genes per person.

Privacy: files that are missing, unreadable or do not match the CDM are counted by reason
and skipped; nothing here raises on a bad file.  Reports hold counts only, and no message or
exception raised here names a person, a file path or a value from a file, so both may be
shown off-site (mask small counts with :meth:`ImageLinks.masked_report`).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import hashlib
import io
import os
import struct
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISDIR, S_ISREG
from typing import Any

import numpy as np
import pandas as pd
import pydicom
import sqlalchemy as sa
from pydicom.uid import UID

from omopfl.config import SiteConfig
from omopfl.db import describe_driver_error, existing_tables, qualified
from omopfl.errors import CdmError, ConfigError, DatabaseError, DataError
from omopfl.study import StudyConfig

__all__ = [
    "IMAGE_REPORT_KEYS",
    "ImageLinks",
    "LazyImages",
    "NORMALIZATIONS",
    "OMICS_REPORT_KEYS",
    "OMICS_WINDOW",
    "OmicsLinks",
    "link_images",
    "link_omics",
]

#: Days around the index date in which a specimen counts (the study file has no omics window).
OMICS_WINDOW: tuple[int, int] = (-365, 0)
#: Per-image intensity normalizations: ``minmax`` maps the 1st..99th percentile to [0, 1]
#: (clipped); ``zscore`` subtracts the mean and divides by the standard deviation.
NORMALIZATIONS = ("minmax", "zscore")
#: Part of every cache key: bump it when decoding, resizing or normalizing changes.
CACHE_VERSION = "1"
PERSON_BATCH = 1000  # persons per query (three bound parameters each)

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
OMICS_REPORT_KEYS: tuple[str, ...] = (
    "persons",
    "linked",
    "unlinked",
    "no_candidate",
    "candidates",
    "files_checked",
    "no_path",
    "outside_root",
    "missing_file",
    "unreadable",  # not a UTF-8 table with gene and value columns
    "mismatched_patient",  # manifest person differs from the CDM specimen's person
    "unknown_specimen",  # manifest specimen_id not in the CDM specimen table
    "bad_manifest_rows",
    "files_missing_genes",  # linked files lacking at least one study gene
    "invalid_values",  # non-numeric, non-finite (or negative with log1p) study-gene values
    "files_with_extra_genes",  # linked files holding genes the study does not use (ignored)
    "genes_missing",  # {gene: linked files lacking it}
)

# Header elements read for the checks (everything else is skipped while parsing).
_HEADER_TAGS = [
    "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "Rows", "Columns", "BitsAllocated",
    "SamplesPerPixel", "NumberOfFrames", "PhotometricInterpretation", "InstanceNumber",
]
MAX_SERIES_FILES = 2000  # headers read at most per series folder
_PIXEL_ELEMENTS = {(0x7FE0, 0x0008), (0x7FE0, 0x0009), (0x7FE0, 0x0010)}
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_UNDEFINED_LENGTH = 0xFFFFFFFF


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def _persons(persons: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """``(person_id int64, index_date datetime64[D])`` from the cohort frame, checked."""
    if not isinstance(persons, pd.DataFrame) or not {"person_id", "index_date"} <= set(persons.columns):
        raise DataError("persons must be a DataFrame with columns person_id and index_date")
    ids = pd.to_numeric(persons["person_id"], errors="coerce")
    if ids.isna().any() or not np.all(np.mod(ids.to_numpy(dtype=float), 1) == 0):
        raise DataError("persons: person_id must be whole numbers without missing values")
    ids_array = ids.to_numpy(dtype=np.int64)
    if len(np.unique(ids_array)) != len(ids_array):
        raise DataError("persons: person_id must be unique (one index date per person)")
    dates = pd.to_datetime(persons["index_date"], errors="coerce")
    if dates.isna().any():
        raise DataError("persons: index_date must be a date for every person")
    return ids_array, dates.to_numpy().astype("datetime64[D]")


def _day(value: Any) -> np.datetime64:
    """A driver's date/datetime/Timestamp as ``datetime64[D]``."""
    if isinstance(value, dt.datetime):
        value = value.date()
    return np.datetime64(value, "D")


def _inside(root: Path, text: str) -> Path | None:
    """``root / text`` if it stays inside ``root`` (lexically; symlinks are the site's business), else None.

    Absolute paths are taken as they are.
    """
    candidate = Path(text)
    if candidate.is_absolute():
        return candidate
    base = os.path.normpath(os.path.abspath(root))
    joined = os.path.normpath(os.path.join(base, text))
    if joined != base and not joined.startswith(base + os.sep):
        return None
    return Path(joined)


def _clean(value: Any) -> str | None:
    """A CDM/manifest text value: stripped, None when empty or missing."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    text = str(value).strip().strip("\x00").strip()
    return text or None


@dataclass
class _Candidate:
    position: int  # row of the persons frame
    person_id: int
    day: np.datetime64 | None
    path: str | None
    study_uid: str | None = None
    series_uid: str | None = None
    order: int = 0  # manifest row: later rows count as newer when dates tie or are absent


def _read_manifest(manifest: Path, required: set[str], what: str) -> pd.DataFrame:
    try:
        frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise DataError(f"{what} manifest file not found; check the manifest argument") from None
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError):
        raise DataError(f"{what} manifest is not a readable CSV file") from None
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    missing = sorted(required - set(frame.columns))
    if missing:
        raise DataError(f"{what} manifest lacks column(s) {', '.join(missing)}; expected {', '.join(sorted(required))}")
    return frame


def _manifest_candidates(frame: pd.DataFrame, positions: dict[int, int], index: np.ndarray,
                         window: tuple[int, int], counts: dict[str, Any]) -> list[_Candidate]:
    """Manifest rows of the cohort's persons, in the window when the manifest has a ``date`` column (ISO 8601)."""
    person = pd.to_numeric(frame["person_id"].str.strip(), errors="coerce")
    bad = person.isna() | (person % 1 != 0)
    if "date" in frame.columns:
        days = pd.to_datetime(frame["date"].str.strip(), errors="coerce", format="ISO8601")
        bad |= days.isna()
        day_values: np.ndarray | None = days.to_numpy().astype("datetime64[D]")
    else:
        day_values = None
    counts["bad_manifest_rows"] += int(bad.sum())
    person_ids = person.fillna(-1).to_numpy(dtype=np.int64)
    paths = frame["path"].tolist()
    studies = frame["study_uid"].tolist() if "study_uid" in frame.columns else [None] * len(frame)
    series = frame["series_uid"].tolist() if "series_uid" in frame.columns else [None] * len(frame)
    out: list[_Candidate] = []
    for row in np.flatnonzero(~bad.to_numpy()):
        position = positions.get(int(person_ids[row]))
        if position is None:
            continue
        day = None
        if day_values is not None:
            day = day_values[row]
            offset = int((day - index[position]).astype(int))
            if not window[0] <= offset <= window[1]:
                continue
        out.append(_Candidate(position, int(person_ids[row]), day, _clean(paths[row]), _clean(studies[row]),
                              _clean(series[row]), int(row)))
    return _newest_first(out)


def _newest_first(candidates: list[_Candidate]) -> list[_Candidate]:
    """Group by person (input order), newest date first; later manifest rows win ties."""
    return sorted(candidates, key=lambda c: (c.position, -int(c.day.astype(int)) if c.day is not None else 0,
                                             -c.order))


def _window_rows(conn: sa.Connection, select: str, ids: np.ndarray, index: np.ndarray, window: tuple[int, int],
                 what: str) -> Iterator[sa.Row]:
    """Run ``WITH p (person_id, lo, hi) AS (VALUES ...) <select>`` per batch of persons, streaming rows.

    Every value is a bound parameter; the window bounds are computed here, so the SQL needs
    no dialect-specific date arithmetic.
    """
    lo = index + np.timedelta64(window[0], "D")
    hi = index + np.timedelta64(window[1], "D")
    for start in range(0, len(ids), PERSON_BATCH):
        stop = min(start + PERSON_BATCH, len(ids))
        values = ", ".join(f"(CAST(:p{i} AS BIGINT), CAST(:l{i} AS DATE), CAST(:h{i} AS DATE))"
                           for i in range(stop - start))
        params: dict[str, Any] = {}
        for i, k in enumerate(range(start, stop)):
            params[f"p{i}"] = int(ids[k])
            params[f"l{i}"] = lo[k].astype(object)
            params[f"h{i}"] = hi[k].astype(object)
        try:
            result = conn.execute(sa.text(f"WITH p (person_id, lo, hi) AS (VALUES {values}) {select}"), params,
                                  execution_options={"yield_per": 500})
            yield from result
        except sa.exc.DBAPIError as exc:
            raise DatabaseError(f"{what} query failed ({describe_driver_error(exc)})") from None


def _require_table(conn: sa.Connection, site: SiteConfig, table: str, hint: str) -> None:
    try:
        tables = existing_tables(conn, site.cdm_schema)
    except sa.exc.DBAPIError as exc:
        raise DatabaseError(f"site {site.name}: cannot list CDM tables ({describe_driver_error(exc)})") from None
    if table not in tables:
        raise CdmError(f"site {site.name}: schema {site.cdm_schema} has no {table} table; {hint}")


def _by_person(candidates: Iterable[_Candidate]) -> Iterator[list[_Candidate]]:
    """Group consecutive candidates of the same person (input is ordered by person)."""
    group: list[_Candidate] = []
    for candidate in candidates:
        if group and candidate.position != group[0].position:
            yield group
            group = []
        group.append(candidate)
    if group:
        yield group


# ----------------------------------------------------------------------------------------------
# DICOM headers
# ----------------------------------------------------------------------------------------------


def _frames(ds: pydicom.Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _pixel_reason(fp: Any, ds: pydicom.Dataset, file_size: int) -> str | None:
    """Check the pixel data element the header read stopped at, without reading it."""
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is None:
        return "unreadable"
    uid = UID(str(syntax))
    if not uid.is_transfer_syntax:
        return "unsupported_encoding"
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        return "no_pixels"
    if rows < 1 or columns < 1:
        return "no_pixels"
    if not uid.is_deflated:  # deflated files are a compressed stream: file offsets mean nothing
        position = fp.tell()
        head = fp.read(12)
        if len(head) < 8:
            return "no_pixels"
        endian = "<" if uid.is_little_endian else ">"
        group, element = struct.unpack(endian + "HH", head[:4])
        if (group, element) not in _PIXEL_ELEMENTS:
            return "no_pixels"
        if uid.is_implicit_VR:
            (length,), header = struct.unpack(endian + "I", head[4:8]), 8
        elif head[4:6] in _LONG_VRS:
            if len(head) < 12:
                return "truncated"
            (length,), header = struct.unpack(endian + "I", head[8:12]), 12
        else:
            (length,), header = struct.unpack(endian + "H", head[6:8]), 8
        if length == _UNDEFINED_LENGTH:
            if position + header >= file_size:
                return "truncated"
        else:
            if position + header + length > file_size:
                return "truncated"
            if not uid.is_encapsulated:
                bits = int(ds.get("BitsAllocated", 16) or 16)
                samples = int(ds.get("SamplesPerPixel", 1) or 1)
                expected = (rows * columns * samples * _frames(ds) * bits + 7) // 8
                if length < expected:
                    return "truncated"
    if uid.is_compressed:
        try:
            available = pydicom.pixels.get_decoder(uid).is_available
        except (NotImplementedError, ValueError):
            available = False
        if not available:
            return "unsupported_encoding"
    return None


@dataclass(frozen=True)
class _Checked:
    reason: str | None  # None: the file passed every check
    path: Path | None = None
    size: int = 0
    mtime_ns: int = 0
    instance: int = 0


def _check_dicom(path: Path, person_id: int, study_uid: str | None, series_uid: str | None,
                 modalities: frozenset[str]) -> _Checked:
    """Check one candidate file's header against the CDM row; never raises."""
    try:
        stat = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return _Checked("missing_file")
    except OSError:
        return _Checked("unreadable")
    if not S_ISREG(stat.st_mode):
        return _Checked("missing_file")
    try:
        with path.open("rb") as fp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about odd values; the checks below decide
            ds = pydicom.dcmread(fp, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            pixel_reason = _pixel_reason(fp, ds, stat.st_size)
        patient = _clean(ds.get("PatientID"))
        file_study = _clean(ds.get("StudyInstanceUID"))
        file_series = _clean(ds.get("SeriesInstanceUID"))
        modality = (_clean(ds.get("Modality")) or "").upper()
        try:
            instance = int(ds.get("InstanceNumber") or 0)
        except (TypeError, ValueError):
            instance = 0
    except Exception:  # any parse failure of a site file is a count, never a crash
        return _Checked("unreadable")
    if patient != str(person_id):
        reason = "mismatched_patient"
    elif study_uid is not None and file_study != study_uid:
        reason = "mismatched_study"
    elif series_uid is not None and file_series != series_uid:
        reason = "mismatched_series"
    elif modality not in modalities:
        reason = "wrong_modality"
    else:
        reason = pixel_reason
    return _Checked(reason, path, int(stat.st_size), int(stat.st_mtime_ns), instance)


def _check_target(path: Path, person_id: int, study_uid: str | None, series_uid: str | None,
                  modalities: frozenset[str]) -> _Checked:
    """A file, or a series folder: then the middle slice (by InstanceNumber, then name) of the files that pass.

    Files of a folder that fail are ignored when another passes; when none passes, the first
    file's reason is the folder's.
    """
    try:
        is_folder = S_ISDIR(path.stat().st_mode)
    except OSError:
        is_folder = False
    if not is_folder:
        return _check_dicom(path, person_id, study_uid, series_uid, modalities)
    try:
        files = sorted(f for f in path.iterdir() if not f.name.startswith(".") and f.is_file())
    except OSError:
        return _Checked("unreadable")
    passing: list[_Checked] = []
    first_reason: str | None = None
    for file in files[:MAX_SERIES_FILES]:
        checked = _check_dicom(file, person_id, study_uid, series_uid, modalities)
        if checked.reason is None:
            passing.append(checked)
        elif first_reason is None:
            first_reason = checked.reason
    if not passing:
        return _Checked(first_reason or "missing_file")
    passing.sort(key=lambda c: (c.instance, c.path.name if c.path else ""))
    return passing[len(passing) // 2]


# ----------------------------------------------------------------------------------------------
# Pixels
# ----------------------------------------------------------------------------------------------


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """Pad to a centred square (with the image minimum), then resample to ``size`` x ``size``.

    Integer down-scaling is an exact block mean; otherwise a box filter (when shrinking by
    2x or more, against aliasing) is followed by linear interpolation.
    """
    from scipy import ndimage

    h, w = image.shape
    side = max(h, w)
    if h != w:
        square = np.full((side, side), float(image.min()), dtype=np.float64)
        top, left = (side - h) // 2, (side - w) // 2
        square[top:top + h, left:left + w] = image
        image = square
    if side == size:
        return image
    if side > size and side % size == 0:
        k = side // size
        return image.reshape(size, k, size, k).mean(axis=(1, 3))
    if side >= 2 * size:
        image = ndimage.uniform_filter(image, size=side // size, mode="nearest")
    out = ndimage.zoom(image, size / side, order=1, mode="nearest", grid_mode=True)
    if out.shape != (size, size):  # rounding guard
        fixed = np.full((size, size), float(out.min()), dtype=np.float64)
        fixed[:min(size, out.shape[0]), :min(size, out.shape[1])] = out[:size, :size]
        out = fixed
    return out


def _normalize(image: np.ndarray, method: str) -> np.ndarray:
    if method == "zscore":
        std = float(image.std())
        return (image - image.mean()) / std if std > 1e-12 else np.zeros_like(image)
    lo, hi = np.percentile(image, [1.0, 99.0])
    if hi - lo <= 1e-12:
        return np.zeros_like(image)
    return np.clip((image - lo) / (hi - lo), 0.0, 1.0)


def _decode_pixels(path: str, size: int, normalize: str) -> np.ndarray:
    """Decode one DICOM image to a float32 ``size`` x ``size`` array.

    Modality LUT (RescaleSlope/RescaleIntercept) first, MONOCHROME1 inverted, the middle
    frame of a multi-frame image, the mean of the channels of a colour image; then
    :func:`_resize` and the per-image normalization.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. excess padding; real failures raise
        ds = pydicom.dcmread(path)
        frames = _frames(ds)
        pixels = pydicom.pixels.pixel_array(ds, index=frames // 2) if frames > 1 else ds.pixel_array
    if pixels.ndim == 3:  # colour (rows, columns, samples): pydicom returns RGB
        image = pixels.astype(np.float64).mean(axis=-1)
    else:
        image = np.asarray(pydicom.pixels.apply_rescale(pixels, ds), dtype=np.float64)
        if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
            image = image.max() + image.min() - image
    if image.ndim != 2:
        raise ValueError("not a single-plane image")
    image = np.nan_to_num(image, nan=0.0, posinf=0.0, neginf=0.0)
    return _normalize(_resize(image, size), normalize).astype(np.float32)


class LazyImages:
    """Linked images, decoded on first access and cached on disk.

    ``get(i)`` returns a float32 ``size`` x ``size`` array.  A cache miss decodes the file
    (:func:`_decode_pixels`) and writes ``<cache_dir>/<sha256>.npy``, the key covering the
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

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

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
            image = _decode_pixels(self._entries[i][0], self.size, self.normalize)
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


def _mask(report: dict[str, Any], min_cell_count: int) -> dict[str, Any]:
    def one(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: one(v) for k, v in value.items()}
        if isinstance(value, int) and 0 < value < min_cell_count:
            return f"<{min_cell_count}"
        return value

    return {k: one(v) for k, v in report.items()}


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
        return _mask(self.report, min_cell_count)

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


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------


def _image_candidates_db(conn: sa.Connection, site: SiteConfig, ids: np.ndarray, index: np.ndarray,
                         window: tuple[int, int], positions: dict[int, int]) -> Iterator[_Candidate]:
    _require_table(conn, site, "image_occurrence",
                   "load the OMOP imaging extension or pass an image manifest")
    table = qualified(site.cdm_schema, "image_occurrence")
    select = (
        "SELECT io.person_id, io.image_occurrence_date, io.local_path, io.image_study_uid, io.image_series_uid "
        f"FROM {table} io JOIN p ON io.person_id = p.person_id "
        "WHERE io.image_occurrence_date BETWEEN p.lo AND p.hi "
        "ORDER BY io.person_id, io.image_occurrence_date DESC, io.image_occurrence_id DESC"
    )
    for row in _window_rows(conn, select, ids, index, window, f"site {site.name}: image_occurrence"):
        person_id = int(row[0])
        yield _Candidate(positions[person_id], person_id, _day(row[1]), _clean(row[2]), _clean(row[3]),
                         _clean(row[4]))


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
    ids, index = _persons(persons)
    positions = {int(p): k for k, p in enumerate(ids)}
    counts: dict[str, int] = dict.fromkeys(IMAGE_REPORT_KEYS, 0)
    counts["persons"] = len(ids)
    modalities = frozenset(m.strip().upper() for m in spec.modalities)
    if normalize not in NORMALIZATIONS:
        raise ConfigError(f"image normalization must be one of {', '.join(NORMALIZATIONS)}")
    if manifest is not None:
        frame = _read_manifest(Path(manifest), {"person_id", "path"}, "image")
        root = site.image_root if site.image_root is not None else Path(manifest).parent
        candidates: Iterable[_Candidate] = _manifest_candidates(frame, positions, index, spec.window, counts)
    else:
        if site.image_root is None:
            where = f"{site.source}: " if site.source else f"site {site.name}: "
            raise ConfigError(f"{where}[files] image_root is not set; set it or pass an image manifest")
        if conn is None:
            raise ConfigError("link_images needs a database connection unless an image manifest is given")
        root = site.image_root
        candidates = _image_candidates_db(conn, site, ids, index, spec.window, positions)

    linked: list[tuple[int, int, int, tuple[str, int, int]]] = []  # position, person, days, entry
    seen: set[int] = set()
    for group in _by_person(candidates):
        seen.add(group[0].position)
        counts["candidates"] += len(group)
        for candidate in group:
            if candidate.path is None:
                counts["no_path"] += 1
                continue
            path = _inside(root, candidate.path)
            if path is None:
                counts["outside_root"] += 1
                continue
            counts["files_checked"] += 1
            checked = _check_target(path, candidate.person_id, candidate.study_uid, candidate.series_uid,
                                    modalities)
            if checked.reason is not None or checked.path is None:
                counts[checked.reason or "missing_file"] += 1
                continue
            days = int((candidate.day - index[candidate.position]).astype(int)) if candidate.day is not None else 0
            linked.append((candidate.position, candidate.person_id, days,
                           (str(checked.path), checked.size, checked.mtime_ns)))
            break
    linked.sort(key=lambda item: item[0])
    counts["linked"] = len(linked)
    counts["unlinked"] = len(ids) - len(linked)
    counts["no_candidate"] = len(ids) - len(seen)
    images = LazyImages([item[3] for item in linked], spec.size, Path(cache_dir), normalize)
    return ImageLinks(
        person_ids=np.array([item[1] for item in linked], dtype=np.int64),
        positions=np.array([item[0] for item in linked], dtype=np.int64),
        days_from_index=np.array([item[2] for item in linked], dtype=np.int64),
        images=images,
        counts=counts,
    )


# ----------------------------------------------------------------------------------------------
# Omics
# ----------------------------------------------------------------------------------------------


@dataclass
class OmicsLinks:
    """Result of :func:`link_omics`.

    Attributes
    ----------
    frame:
        One row per input person (index ``person_id``, input order), one float64 column per
        study gene; NaN where the person is unlinked or the gene is missing or invalid.
    linked:
        Boolean per input person.
    report:
        Counts only (see :data:`OMICS_REPORT_KEYS`); ``genes_missing`` maps each study gene
        to the number of linked files lacking it.
    """

    frame: pd.DataFrame = field(repr=False)
    linked: np.ndarray = field(repr=False)
    report: dict[str, Any] = field(repr=False)

    def __repr__(self) -> str:
        return f"OmicsLinks(linked={int(self.linked.sum())}, persons={len(self.linked)}, genes={self.frame.shape[1]})"

    @property
    def matrix(self) -> pd.DataFrame:
        """Alias of ``frame`` (persons x genes)."""
        return self.frame

    def masked_report(self, min_cell_count: int) -> dict[str, Any]:
        """``report`` with counts in ``1 .. min_cell_count - 1`` shown as ``"<N"``."""
        return _mask(self.report, min_cell_count)


class _Unreadable(Exception):
    pass


def _read_expression(path: Path) -> dict[str, str]:
    """``gene -> value text`` from a ``gene,value`` CSV (or tab-separated) file; the first row of a gene wins."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError):
        raise _Unreadable from None
    first = text.split("\n", 1)[0]
    delimiter = "\t" if "\t" in first and "," not in first else ","
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    try:
        header = [h.strip().lower() for h in next(reader)]
        gene_at, value_at = header.index("gene"), header.index("value")
        values: dict[str, str] = {}
        for row in reader:
            if len(row) <= max(gene_at, value_at):
                if any(cell.strip() for cell in row):
                    raise _Unreadable
                continue
            values.setdefault(row[gene_at].strip(), row[value_at])
    except (StopIteration, ValueError, csv.Error):
        raise _Unreadable from None
    return values


def _specimen_candidates_db(conn: sa.Connection, site: SiteConfig, ids: np.ndarray, index: np.ndarray,
                            window: tuple[int, int], positions: dict[int, int]) -> Iterator[_Candidate]:
    _require_table(conn, site, "specimen", "pass an omics manifest")
    table = qualified(site.cdm_schema, "specimen")
    select = (
        "SELECT s.person_id, s.specimen_date, s.specimen_source_id "
        f"FROM {table} s JOIN p ON s.person_id = p.person_id "
        "WHERE s.specimen_date BETWEEN p.lo AND p.hi "
        "ORDER BY s.person_id, s.specimen_date DESC, s.specimen_id DESC"
    )
    for row in _window_rows(conn, select, ids, index, window, f"site {site.name}: specimen"):
        person_id = int(row[0])
        yield _Candidate(positions[person_id], person_id, _day(row[1]), _clean(row[2]))


def _specimen_dates(conn: sa.Connection, site: SiteConfig, specimen_ids: list[int]) -> dict[int, tuple[int, Any]]:
    """``specimen_id -> (person_id, specimen_date)`` from the CDM, for the manifest's specimens."""
    _require_table(conn, site, "specimen", "give the omics manifest a date column")
    table = qualified(site.cdm_schema, "specimen")
    statement = sa.text(
        f"SELECT specimen_id, person_id, specimen_date FROM {table} WHERE specimen_id IN :ids"
    ).bindparams(sa.bindparam("ids", expanding=True))
    out: dict[int, tuple[int, Any]] = {}
    for start in range(0, len(specimen_ids), PERSON_BATCH):
        try:
            for row in conn.execute(statement, {"ids": specimen_ids[start:start + PERSON_BATCH]}):
                out[int(row[0])] = (int(row[1]), row[2])
        except sa.exc.DBAPIError as exc:
            raise DatabaseError(f"site {site.name}: specimen query failed ({describe_driver_error(exc)})") from None
    return out


def _omics_manifest_candidates(conn: sa.Connection | None, site: SiteConfig, frame: pd.DataFrame,
                               positions: dict[int, int], index: np.ndarray, window: tuple[int, int],
                               counts: dict[str, Any]) -> list[_Candidate]:
    if "date" in frame.columns or "specimen_id" not in frame.columns:
        return _manifest_candidates(frame, positions, index, window, counts)
    if conn is None:
        raise ConfigError("an omics manifest without a date column needs a database connection: "
                          "specimen dates come from the CDM specimen table")
    # Dates (and the owner) of each specimen come from the CDM: the manifest only maps specimens to files.
    rows: list[tuple[int, int, str | None, int]] = []  # specimen, person, path, manifest row
    for row_number, (person_text, specimen_text, path) in enumerate(
            zip(frame["person_id"], frame["specimen_id"], frame["path"], strict=True)):
        try:
            person_id, specimen_id = int(str(person_text).strip()), int(str(specimen_text).strip())
        except ValueError:
            counts["bad_manifest_rows"] += 1
            continue
        if person_id in positions:
            rows.append((specimen_id, person_id, _clean(path), row_number))
    known = _specimen_dates(conn, site, sorted({r[0] for r in rows}))
    out: list[_Candidate] = []
    for specimen_id, person_id, path, row_number in rows:
        if specimen_id not in known:
            counts["unknown_specimen"] += 1
            continue
        owner, date = known[specimen_id]
        if owner != person_id:
            counts["mismatched_patient"] += 1
            continue
        if date is None:
            counts["bad_manifest_rows"] += 1
            continue
        position = positions[person_id]
        day = _day(date)
        offset = int((day - index[position]).astype(int))
        if window[0] <= offset <= window[1]:
            out.append(_Candidate(position, person_id, day, path, order=row_number))
    return _newest_first(out)


def link_omics(
    conn: sa.Connection | None,
    site: SiteConfig,
    study: StudyConfig,
    persons: pd.DataFrame,
    manifest: Path | None = None,
    *,
    window: tuple[int, int] = OMICS_WINDOW,
) -> OmicsLinks:
    """Link each person to the expression profile of their newest specimen in ``window`` around index.

    The window is ``[-365, 0]`` days by default (:data:`OMICS_WINDOW`): the newest specimen
    taken in the year before the index date, or on it.

    Parameters
    ----------
    conn:
        Open connection to the site's database (read-only use).  May be None with a manifest
        that has a ``date`` column.
    site:
        The site; file names resolve against ``site.omics_root``.
    study:
        ``study.omics`` gives the genes (exact symbols; extra genes in a file are ignored)
        and whether values become ``log1p(value)``.
    persons:
        Columns ``person_id`` (unique) and ``index_date``.
    manifest:
        Optional CSV with ``person_id, path`` and ``specimen_id`` or ``date`` (e.g. the
        ``<omics_root>/manifest.csv`` the synthetic sites write).  With ``specimen_id`` and
        no ``date``, each specimen's date and person come from the CDM ``specimen`` table
        (a person mismatch is counted); with neither, every row of the person counts and
        later rows are newer.  Without a manifest, ``specimen.specimen_source_id`` is the
        file name under ``omics_root``.
    window:
        Days relative to index, inclusive.

    Returns
    -------
    OmicsLinks
        Per-person expression matrix over ``study.omics.genes`` and counts.

    Raises
    ------
    ConfigError
        No ``omics_root`` and no manifest.
    CdmError, DataError, DatabaseError
        As for :func:`link_images`.
    """
    spec = study.omics
    genes = list(dict.fromkeys(spec.genes))
    column = {g: j for j, g in enumerate(genes)}
    ids, index = _persons(persons)
    positions = {int(p): k for k, p in enumerate(ids)}
    counts: dict[str, Any] = {key: 0 for key in OMICS_REPORT_KEYS if key != "genes_missing"}
    counts["persons"] = len(ids)
    genes_missing = dict.fromkeys(genes, 0)
    if manifest is not None:
        frame = _read_manifest(Path(manifest), {"person_id", "path"}, "omics")
        root = site.omics_root if site.omics_root is not None else Path(manifest).parent
        candidates: Iterable[_Candidate] = _omics_manifest_candidates(conn, site, frame, positions, index,
                                                                      window, counts)
    else:
        if site.omics_root is None:
            where = f"{site.source}: " if site.source else f"site {site.name}: "
            raise ConfigError(f"{where}[files] omics_root is not set; set it or pass an omics manifest")
        if conn is None:
            raise ConfigError("link_omics needs a database connection unless an omics manifest is given")
        root = site.omics_root
        candidates = _specimen_candidates_db(conn, site, ids, index, window, positions)

    matrix = np.full((len(ids), len(genes)), np.nan, dtype=np.float64)
    linked = np.zeros(len(ids), dtype=bool)
    seen: set[int] = set()
    for group in _by_person(candidates):
        seen.add(group[0].position)
        counts["candidates"] += len(group)
        for candidate in group:
            if candidate.path is None:
                counts["no_path"] += 1
                continue
            path = _inside(root, candidate.path)
            if path is None:
                counts["outside_root"] += 1
                continue
            counts["files_checked"] += 1
            if not path.is_file():
                counts["missing_file"] += 1
                continue
            try:
                values = _read_expression(path)
            except _Unreadable:
                counts["unreadable"] += 1
                continue
            row = matrix[candidate.position]
            lacking = 0
            for gene in genes:
                text = values.get(gene)
                if text is None:
                    genes_missing[gene] += 1
                    lacking += 1
                    continue
                try:
                    value = float(text)
                except ValueError:
                    value = float("nan")
                if not np.isfinite(value) or (spec.log1p and value < 0):
                    counts["invalid_values"] += 1
                    continue
                row[column[gene]] = np.log1p(value) if spec.log1p else value
            counts["files_missing_genes"] += lacking > 0
            counts["files_with_extra_genes"] += any(g not in column for g in values)
            linked[candidate.position] = True
            break
    counts["linked"] = int(linked.sum())
    counts["unlinked"] = len(ids) - counts["linked"]
    counts["no_candidate"] = len(ids) - len(seen)
    report = {key: (genes_missing if key == "genes_missing" else int(counts[key])) for key in OMICS_REPORT_KEYS}
    out = pd.DataFrame(matrix, columns=genes, index=pd.Index(ids, name="person_id"))
    return OmicsLinks(frame=out, linked=linked, report=report)
