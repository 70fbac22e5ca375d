"""Synthetic MR slices: the ``image_occurrence`` rows of linked persons and the DICOM files they name.

Part of the synthetic generator (:mod:`omopfl.synth`), and one of the two modules (with
:mod:`omopfl.linking.dicom`) that import pydicom.  Each slice is a Gaussian blob on a noisy background;
the latent image signal sets the blob's brightness and width.  UIDs are derived from the site, seed,
person and row id, so the files are reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from omopfl.synth.concepts import MRI
from omopfl.synth.rows import ChunkContext

__all__ = ["IMAGE_SIZE", "ImageJob", "image_rows", "write_dicom"]

IMAGE_SIZE = 64


@dataclass
class ImageJob:
    """One DICOM file to write."""

    person_id: int
    birth_day: int
    male: bool
    study_day: int
    path: str
    study_uid: str
    series_uid: str
    sop_uid: str
    frame_uid: str
    pixels: np.ndarray


def image_rows(ctx: ChunkContext, site: str, seed: int, procedure_ids: np.ndarray,
               image_day: np.ndarray) -> tuple[pd.DataFrame, list[ImageJob]]:
    """The ``image_occurrence`` rows of the persons with a linked image, and their files.

    ``procedure_ids`` and ``image_day`` are the MR procedures behind the images
    (:func:`omopfl.synth.clinical.procedures`).
    """
    rng, pp = ctx.rng, ctx.people
    pid, birth, male, u_image = pp.pid, pp.birth, pp.male, pp.u_image
    s = np.flatnonzero(pp.linked_image)
    if len(s):
        from pydicom.uid import generate_uid
    first = ctx.next_ids("image_occurrence", len(s))
    image_id = first + np.arange(len(s))
    size = IMAGE_SIZE
    yy, xx = np.mgrid[0:size, 0:size]
    cx = size / 2 + rng.normal(0.0, 4.0, len(s))
    cy = size / 2 + rng.normal(0.0, 4.0, len(s))
    # The latent signal sets the blob's brightness and its width: the width survives the per-image
    # intensity normalization of omopfl's linking (which maps every blob's peak to about 1).
    amplitude = np.clip(520.0 + 240.0 * u_image[s], 40.0, 1600.0)
    width = np.clip(6.0 + 1.5 * u_image[s], 2.5, 10.0)
    blob = amplitude[:, None, None] * np.exp(
        -((xx[None] - cx[:, None, None]) ** 2 + (yy[None] - cy[:, None, None]) ** 2)
        / (2 * width[:, None, None] ** 2))
    pixels = np.clip(900.0 + blob + rng.normal(0.0, 25.0, (len(s), size, size)), 0, 65535).astype(np.uint16)
    jobs: list[ImageJob] = []
    study, series, paths = [], [], []
    for j, person in enumerate(s):
        # pydicom's root with a SHA-512 of the entropy: deterministic (prefix=None would ignore it).
        entropy = f"omopfl-synth|{site}|{seed}|{int(pid[person])}|{int(image_id[j])}|"
        study_uid = generate_uid(entropy_srcs=[entropy + "study"])
        series_uid = generate_uid(entropy_srcs=[entropy + "series"])
        sop_uid = generate_uid(entropy_srcs=[entropy + "sop"])
        frame_uid = generate_uid(entropy_srcs=[entropy + "frame"])
        path = f"{int(pid[person])}/mr_{int(image_id[j])}.dcm"
        study.append(study_uid)
        series.append(series_uid)
        paths.append(path)
        jobs.append(ImageJob(int(pid[person]), int(birth[person]), bool(male[person]), int(image_day[j]), path,
                             study_uid, series_uid, sop_uid, frame_uid, pixels[j]))
    frame = pd.DataFrame({
        "image_occurrence_id": image_id,
        "person_id": pid[s],
        "procedure_occurrence_id": np.asarray(procedure_ids, dtype=np.int64),
        "local_path": np.array(paths, dtype=object),
        "image_occurrence_date": image_day.astype("datetime64[D]"),
        "image_study_uid": np.array(study, dtype=object),
        "image_series_uid": np.array(series, dtype=object),
        "modality_concept_id": MRI,
    })
    return frame, jobs



def _date_text(day: int) -> str:
    return str(np.datetime64(day, "D")).replace("-", "")


def write_dicom(root: Path, job: ImageJob) -> None:
    """One 64x64 MR slice (uint16, explicit VR little endian) with the attributes readers require."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = job.sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = job.sop_uid
    ds.StudyInstanceUID = job.study_uid
    ds.SeriesInstanceUID = job.series_uid
    ds.FrameOfReferenceUID = job.frame_uid
    ds.PatientID = str(job.person_id)
    ds.PatientName = f"SYNTHETIC^{job.person_id}"
    ds.PatientBirthDate = _date_text(job.birth_day)
    ds.PatientSex = "M" if job.male else "F"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = _date_text(job.study_day)
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.Modality = "MR"
    ds.Manufacturer = "omopfl synthetic"
    ds.BodyPartExamined = "HEART"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.EchoTime = 20
    ds.RepetitionTime = 500
    ds.MagneticFieldStrength = 1.5
    ds.SliceThickness = 8
    ds.PixelSpacing = [2, 2]
    ds.ImagePositionPatient = [0, 0, 0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = job.pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = job.pixels.astype("<u2").tobytes()
    path = root / job.path
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
