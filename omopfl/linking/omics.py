"""Link each person of a cohort to an omics expression profile: the newest specimen's ``gene,value`` file.

:func:`link_omics` finds, per person, the newest specimen dated in :data:`OMICS_WINDOW` (``[-365, 0]``
days around index) whose file (``specimen_source_id`` under the site's ``omics_root``, or a manifest
row) reads as a ``gene,value`` table, and returns one expression vector over the study's genes per
person.  The candidate search is :mod:`omopfl.linking.candidates`'.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from omopfl.config import SiteConfig
from omopfl.db import describe_driver_error, qualified
from omopfl.errors import ConfigError, DatabaseError
from omopfl.linking.candidates import (
    PERSON_BATCH,
    Candidate,
    as_day,
    candidate_source,
    clean_text,
    cohort_persons,
    first_usable_files,
    manifest_candidates,
    mask_counts,
    newest_first,
    require_table,
    window_rows,
)
from omopfl.study import StudyConfig

__all__ = ["OMICS_REPORT_KEYS", "OMICS_WINDOW", "OmicsLinks", "link_omics"]

#: Days around the index date in which a specimen counts (the study file has no omics window).
OMICS_WINDOW: tuple[int, int] = (-365, 0)
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
        return mask_counts(self.report, min_cell_count)


class _Unreadable(Exception):
    """The file is not a UTF-8 ``gene,value`` table."""


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
                            window: tuple[int, int], positions: dict[int, int]) -> Iterator[Candidate]:
    require_table(conn, site, "specimen", "pass an omics manifest")
    table = qualified(site.cdm_schema, "specimen")
    select = (
        "SELECT s.person_id, s.specimen_date, s.specimen_source_id "
        f"FROM {table} s JOIN p ON s.person_id = p.person_id "
        "WHERE s.specimen_date BETWEEN p.lo AND p.hi "
        "ORDER BY s.person_id, s.specimen_date DESC, s.specimen_id DESC"
    )
    for row in window_rows(conn, select, ids, index, window, f"site {site.name}: specimen"):
        person_id = int(row[0])
        yield Candidate(positions[person_id], person_id, as_day(row[1]), clean_text(row[2]))


def _specimen_dates(conn: sa.Connection, site: SiteConfig, specimen_ids: list[int]) -> dict[int, tuple[int, Any]]:
    """``specimen_id -> (person_id, specimen_date)`` from the CDM, for the manifest's specimens."""
    require_table(conn, site, "specimen", "give the omics manifest a date column")
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
                               counts: dict[str, Any]) -> list[Candidate]:
    if "date" in frame.columns or "specimen_id" not in frame.columns:
        return manifest_candidates(frame, positions, index, window, counts)
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
            rows.append((specimen_id, person_id, clean_text(path), row_number))
    known = _specimen_dates(conn, site, sorted({r[0] for r in rows}))
    out: list[Candidate] = []
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
        day = as_day(date)
        offset = int((day - index[position]).astype(int))
        if window[0] <= offset <= window[1]:
            out.append(Candidate(position, person_id, day, path, order=row_number))
    return newest_first(out)


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
    ids, index = cohort_persons(persons)
    positions = {int(p): k for k, p in enumerate(ids)}
    counts: dict[str, Any] = {key: 0 for key in OMICS_REPORT_KEYS if key != "genes_missing"}
    counts["persons"] = len(ids)
    genes_missing = dict.fromkeys(genes, 0)
    root, candidates = candidate_source(
        kind="omics", caller="link_omics", site=site, root=site.omics_root, conn=conn, manifest=manifest,
        from_manifest=lambda frame: _omics_manifest_candidates(conn, site, frame, positions, index, window, counts),
        from_database=lambda c: _specimen_candidates_db(c, site, ids, index, window, positions))
    matrix = np.full((len(ids), len(genes)), np.nan, dtype=np.float64)
    linked = np.zeros(len(ids), dtype=bool)

    def check(candidate: Candidate, path: Path) -> tuple[str, None] | tuple[None, dict[str, str]]:
        if not path.is_file():
            return "missing_file", None
        try:
            return None, _read_expression(path)
        except _Unreadable:
            return "unreadable", None

    def accept(candidate: Candidate, values: dict[str, str]) -> None:
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

    first_usable_files(candidates, root, check, accept, counts, len(ids))
    report = {key: (genes_missing if key == "genes_missing" else int(counts[key])) for key in OMICS_REPORT_KEYS}
    out = pd.DataFrame(matrix, columns=genes, index=pd.Index(ids, name="person_id"))
    return OmicsLinks(frame=out, linked=linked, report=report)
