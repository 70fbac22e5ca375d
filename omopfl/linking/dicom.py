"""Reading the DICOM files a site links: header checks against the CDM, and pixel decoding.

Besides the synthetic generator's :mod:`omopfl.synth.images`, the only module that imports pydicom.
:func:`check_target` reads a file's *header* only (``stop_before_pixels``) and checks it against the
CDM row: ``PatientID == str(person_id)``, ``StudyInstanceUID`` and ``SeriesInstanceUID`` equal to the
row's UIDs, ``Modality`` one of the study's modalities, and the pixel data element present, complete
and decodable; a series folder stands for its middle slice.  :func:`decode_pixels` decodes one file to
a resized, normalized float32 square.  Never raises on a bad file: the reason is returned as a count key.
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISDIR, S_ISREG
from typing import Any

import numpy as np
import pydicom
from pydicom.uid import UID

from omopfl.linking.candidates import clean_text

__all__ = ["MAX_SERIES_FILES", "Checked", "check_target", "decode_pixels"]

# Header elements read for the checks (everything else is skipped while parsing).
_HEADER_TAGS = [
    "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "Rows", "Columns", "BitsAllocated",
    "SamplesPerPixel", "NumberOfFrames", "PhotometricInterpretation", "InstanceNumber",
]
MAX_SERIES_FILES = 2000  # headers read at most per series folder
_PIXEL_ELEMENTS = {(0x7FE0, 0x0008), (0x7FE0, 0x0009), (0x7FE0, 0x0010)}
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_UNDEFINED_LENGTH = 0xFFFFFFFF


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
class Checked:
    """One file's check: ``reason`` None when it passed; its stat as seen then."""

    reason: str | None  # None: the file passed every check
    path: Path | None = None
    size: int = 0
    mtime_ns: int = 0
    instance: int = 0


def _check_dicom(path: Path, person_id: int, study_uid: str | None, series_uid: str | None,
                 modalities: frozenset[str]) -> Checked:
    """Check one candidate file's header against the CDM row; never raises."""
    try:
        stat = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return Checked("missing_file")
    except OSError:
        return Checked("unreadable")
    if not S_ISREG(stat.st_mode):
        return Checked("missing_file")
    try:
        with path.open("rb") as fp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about odd values; the checks below decide
            ds = pydicom.dcmread(fp, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            pixel_reason = _pixel_reason(fp, ds, stat.st_size)
        patient = clean_text(ds.get("PatientID"))
        file_study = clean_text(ds.get("StudyInstanceUID"))
        file_series = clean_text(ds.get("SeriesInstanceUID"))
        modality = (clean_text(ds.get("Modality")) or "").upper()
        try:
            instance = int(ds.get("InstanceNumber") or 0)
        except (TypeError, ValueError):
            instance = 0
    except Exception:  # any parse failure of a site file is a count, never a crash
        return Checked("unreadable")
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
    return Checked(reason, path, int(stat.st_size), int(stat.st_mtime_ns), instance)


def check_target(path: Path, person_id: int, study_uid: str | None, series_uid: str | None,
                  modalities: frozenset[str]) -> Checked:
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
        return Checked("unreadable")
    passing: list[Checked] = []
    first_reason: str | None = None
    for file in files[:MAX_SERIES_FILES]:
        checked = _check_dicom(file, person_id, study_uid, series_uid, modalities)
        if checked.reason is None:
            passing.append(checked)
        elif first_reason is None:
            first_reason = checked.reason
    if not passing:
        return Checked(first_reason or "missing_file")
    passing.sort(key=lambda c: (c.instance, c.path.name if c.path else ""))
    return passing[len(passing) // 2]


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


def decode_pixels(path: str, size: int, normalize: str) -> np.ndarray:
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
