"""Link each person of a cohort to a DICOM image and an omics expression profile.

The public names of the linking modules, in one place: :mod:`omopfl.linking.images` (images, the
lazy pixel cache), :mod:`omopfl.linking.omics` (expression profiles), :mod:`omopfl.linking.dicom`
(DICOM header checks and decoding, the only linking module that imports pydicom) and
:mod:`omopfl.linking.candidates` (the per-person candidate search both share).

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

from omopfl.linking.images import IMAGE_REPORT_KEYS, NORMALIZATIONS, ImageLinks, LazyImages, link_images
from omopfl.linking.omics import OMICS_REPORT_KEYS, OMICS_WINDOW, OmicsLinks, link_omics

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
