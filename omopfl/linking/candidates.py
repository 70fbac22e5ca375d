"""The search shared by image and omics linking: per person, candidate files, newest first, the first usable.

A candidate is a CDM row (``image_occurrence``, ``specimen``) or a manifest row dated in the study
window around the person's index date.  :func:`candidate_source` picks the manifest or the CDM query,
:func:`first_usable_files` walks each person's candidates newest first, resolves their paths under the
site's root, asks a modality-specific check whether the file is usable and counts every rejection by
reason; the first usable file is the person's.  Counts only: nothing here names a person, a path or a
file's content in a message.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import sqlalchemy as sa

from omopfl.config import SiteConfig
from omopfl.db import describe_driver_error, existing_tables
from omopfl.errors import CdmError, ConfigError, DatabaseError, DataError

__all__ = [
    "PERSON_BATCH",
    "Candidate",
    "as_day",
    "candidate_source",
    "clean_text",
    "cohort_persons",
    "first_usable_files",
    "manifest_candidates",
    "mask_counts",
    "newest_first",
    "require_table",
    "window_rows",
]

PERSON_BATCH = 1000  # persons per query (three bound parameters each)

T = TypeVar("T")


def cohort_persons(persons: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
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


def as_day(value: Any) -> np.datetime64:
    """A driver's date/datetime/Timestamp as ``datetime64[D]``."""
    if isinstance(value, dt.datetime):
        value = value.date()
    return np.datetime64(value, "D")


def inside_root(root: Path, text: str) -> Path | None:
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


def clean_text(value: Any) -> str | None:
    """A CDM/manifest text value: stripped, None when empty or missing."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    text = str(value).strip().strip("\x00").strip()
    return text or None


@dataclass
class Candidate:
    position: int  # row of the persons frame
    person_id: int
    day: np.datetime64 | None
    path: str | None
    study_uid: str | None = None
    series_uid: str | None = None
    order: int = 0  # manifest row: later rows count as newer when dates tie or are absent


def read_manifest(manifest: Path, required: set[str], what: str) -> pd.DataFrame:
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


def manifest_candidates(frame: pd.DataFrame, positions: dict[int, int], index: np.ndarray,
                         window: tuple[int, int], counts: dict[str, Any]) -> list[Candidate]:
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
    out: list[Candidate] = []
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
        out.append(Candidate(position, int(person_ids[row]), day, clean_text(paths[row]), clean_text(studies[row]),
                              clean_text(series[row]), int(row)))
    return newest_first(out)


def newest_first(candidates: list[Candidate]) -> list[Candidate]:
    """Group by person (input order), newest date first; later manifest rows win ties."""
    return sorted(candidates, key=lambda c: (c.position, -int(c.day.astype(int)) if c.day is not None else 0,
                                             -c.order))


def window_rows(conn: sa.Connection, select: str, ids: np.ndarray, index: np.ndarray, window: tuple[int, int],
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


def require_table(conn: sa.Connection, site: SiteConfig, table: str, hint: str) -> None:
    try:
        tables = existing_tables(conn, site.cdm_schema)
    except sa.exc.DBAPIError as exc:
        raise DatabaseError(f"site {site.name}: cannot list CDM tables ({describe_driver_error(exc)})") from None
    if table not in tables:
        raise CdmError(f"site {site.name}: schema {site.cdm_schema} has no {table} table; {hint}")


def by_person(candidates: Iterable[Candidate]) -> Iterator[list[Candidate]]:
    """Group consecutive candidates of the same person (input is ordered by person)."""
    group: list[Candidate] = []
    for candidate in candidates:
        if group and candidate.position != group[0].position:
            yield group
            group = []
        group.append(candidate)
    if group:
        yield group


def candidate_source(*, kind: str, caller: str, site: SiteConfig, root: Path | None, conn: sa.Connection | None,
                     manifest: Path | None, from_manifest: Callable[[pd.DataFrame], Iterable[Candidate]],
                     from_database: Callable[[sa.Connection], Iterable[Candidate]]) -> tuple[Path, Iterable[Candidate]]:
    """The folder relative paths resolve against, and the candidates: from ``manifest`` if given, else the CDM.

    Parameters
    ----------
    kind:
        ``"image"`` or ``"omics"``: names the manifest and the ``[files] <kind>_root`` setting in messages.
    caller:
        The public function, for the message when ``conn`` is missing.
    root:
        The site's ``<kind>_root``; with a manifest and no root, the manifest's folder.
    from_manifest, from_database:
        Build the candidates from the manifest frame (columns ``person_id`` and ``path`` checked)
        or from the connection.

    Raises
    ------
    ConfigError
        No manifest and no root, or no manifest and no connection.
    DataError
        The manifest is missing, unreadable or lacks a required column.
    """
    if manifest is not None:
        frame = read_manifest(Path(manifest), {"person_id", "path"}, kind)
        return (root if root is not None else Path(manifest).parent), from_manifest(frame)
    if root is None:
        where = f"{site.source}: " if site.source else f"site {site.name}: "
        raise ConfigError(f"{where}[files] {kind}_root is not set; set it or pass an {kind} manifest")
    if conn is None:
        raise ConfigError(f"{caller} needs a database connection unless an {kind} manifest is given")
    return root, from_database(conn)


def first_usable_files(candidates: Iterable[Candidate], root: Path,
                       check: Callable[[Candidate, Path], tuple[str, None] | tuple[None, T]],
                       accept: Callable[[Candidate, T], None], counts: dict[str, Any], persons: int) -> None:
    """Per person, the first candidate (in the given order: newest first) whose file passes ``check``.

    Candidates come grouped by person.  A candidate without a path counts as ``no_path``, a relative
    path that climbs out of ``root`` as ``outside_root``; every other one is a file checked
    (``files_checked``): ``check(candidate, path)`` returns ``(reason, None)`` for a file that is not
    usable, counted under ``counts[reason]``, or ``(None, value)``: then ``accept(candidate, value)``
    is called and the person's search ends.  Sets ``candidates``, ``linked``, ``unlinked`` and
    ``no_candidate`` for ``persons`` persons in ``counts``.
    """
    seen: set[int] = set()
    linked = 0
    for group in by_person(candidates):
        seen.add(group[0].position)
        counts["candidates"] += len(group)
        for candidate in group:
            if candidate.path is None:
                counts["no_path"] += 1
                continue
            path = inside_root(root, candidate.path)
            if path is None:
                counts["outside_root"] += 1
                continue
            counts["files_checked"] += 1
            reason, value = check(candidate, path)
            if reason is not None:
                counts[reason] += 1
                continue
            accept(candidate, value)  # type: ignore[arg-type]  # value is set when reason is None
            linked += 1
            break
    counts["linked"] = linked
    counts["unlinked"] = persons - linked
    counts["no_candidate"] = persons - len(seen)


def mask_counts(report: dict[str, Any], min_cell_count: int) -> dict[str, Any]:
    """``report`` with counts in ``1 .. min_cell_count - 1`` shown as ``"<N"`` (nested dicts too)."""
    def one(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: one(v) for k, v in value.items()}
        if isinstance(value, int) and 0 < value < min_cell_count:
            return f"<{min_cell_count}"
        return value

    return {k: one(v) for k, v in report.items()}
