"""Rows of one chunk of synthetic persons: blocks of rows per table, row ids, and the planted dirty rows.

Part of the synthetic generator (:mod:`omopfl.synth`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from omopfl.synth.people import People, uniform_days
from omopfl.synth.profiles import SiteProfile

__all__ = ["DIRTY_TABLES", "ChunkContext", "RowBlocks"]

#: The tables that get planted dirty rows, in the order of the person draw that picks them.
DIRTY_TABLES = ("condition_occurrence", "drug_exposure", "measurement")


def _column(value: Any, n: int) -> np.ndarray:
    if isinstance(value, np.ndarray):
        if len(value) != n:
            raise ValueError("column length differs from the block's person count")
        return value
    if value is None or isinstance(value, str):
        return np.full(n, value, dtype=object)
    return np.full(n, value)


class RowBlocks:
    """Blocks of rows of one table, concatenated, sorted by person and date, then numbered."""

    def __init__(self) -> None:
        self._blocks: list[dict[str, np.ndarray]] = []
        self.size = 0

    def add(self, person: np.ndarray, **columns: Any) -> int:
        """Add a block (``person`` holds chunk-local person indexes); return its first row position."""
        n = len(person)
        block = {"person": np.asarray(person, dtype=np.int64)}
        block.update({name: _column(value, n) for name, value in columns.items()})
        start = self.size
        self._blocks.append(block)
        self.size += n
        return start

    def build(self, id_column: str | None, first_id: int, first_person_id: int, date_column: str,
              date_columns: Sequence[str]) -> tuple[pd.DataFrame, np.ndarray]:
        """Return the frame and, for each added row position, its position in the frame."""
        names = list(dict.fromkeys(name for block in self._blocks for name in block))
        columns: dict[str, np.ndarray] = {}
        for name in names:
            kind = next(block[name].dtype.kind for block in self._blocks if name in block)
            parts = []
            for block in self._blocks:
                if name in block:
                    parts.append(block[name])
                elif kind == "O":
                    parts.append(np.full(len(block["person"]), None, dtype=object))
                else:
                    parts.append(np.full(len(block["person"]), np.nan))
            columns[name] = np.concatenate(parts) if parts else np.empty(0)
        if not columns:
            return pd.DataFrame(), np.empty(0, dtype=np.int64)
        order = np.lexsort((columns[date_column], columns["person"]))
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        data: dict[str, Any] = {}
        if id_column is not None:
            data[id_column] = first_id + np.arange(len(order), dtype=np.int64)
        data["person_id"] = columns.pop("person")[order] + first_person_id
        for name, values in columns.items():
            values = values[order]
            if name in date_columns:
                values = values.astype(np.int64).astype("datetime64[D]")
            data[name] = values
        return pd.DataFrame(data), rank


class ChunkContext:
    """What every table of one chunk of persons shares: the random stream, the persons, ids and dirt counts.

    Parameters
    ----------
    rng:
        The chunk's generator; every table draws from it in a fixed order.
    profile:
        The site's profile.
    people:
        The chunk's persons (see :func:`omopfl.synth.people.draw_people`).
    first_person_id:
        ``person_id`` of the chunk's first person.
    ids:
        Next free row id per table, shared by the site's chunks (updated in place).
    """

    def __init__(self, rng: np.random.Generator, profile: SiteProfile, people: People, first_person_id: int,
                 ids: dict[str, int]) -> None:
        self.rng = rng
        self.profile = profile
        self.people = people
        self.n = len(people.pid)
        self.first_person_id = first_person_id
        self.ids = ids
        self.dirty: dict[str, dict[str, int]] = {"outside_observation_period": {}, "unmapped_concept": {}}

    def uniform(self, low: np.ndarray, high: np.ndarray) -> np.ndarray:
        """Uniform integer days in [low, high] (arrays), from the chunk's stream."""
        return uniform_days(self.rng, low, high)

    def next_ids(self, table: str, n: int) -> int:
        """Reserve ``n`` row ids of ``table``; return the first."""
        first = self.ids[table]
        self.ids[table] = first + n
        return first

    def _planted(self, kind: str, share: float, table: str) -> np.ndarray:
        # One third of the persons drawn for a planted row of ``kind`` get it in each of the three tables.
        draw = self.rng.random(self.n)
        which = DIRTY_TABLES.index(table)
        share = share / 3.0
        chosen = np.flatnonzero((draw >= which * share) & (draw < (which + 1) * share))
        self.dirty[kind][table] = self.dirty[kind].get(table, 0) + len(chosen)
        return chosen

    def outside_persons(self, table: str) -> np.ndarray:
        """Chunk-local persons that get one row of ``table`` dated outside their observation period."""
        return self._planted("outside_observation_period", self.profile.outside_observation_share, table)

    def unmapped_persons(self, table: str) -> np.ndarray:
        """Chunk-local persons that get one row of ``table`` with concept id 0."""
        return self._planted("unmapped_concept", self.profile.unmapped_share, table)

    def outside_day(self, persons: np.ndarray) -> np.ndarray:
        """A day before (60%) or after each person's observation period."""
        obs_start, obs_end = self.people.obs_start, self.people.obs_end
        before = self.rng.random(len(persons)) < 0.6
        gap_before = self.rng.integers(30, 1500, len(persons))
        gap_after = self.rng.integers(30, 365, len(persons))
        return np.where(before, obs_start[persons] - gap_before, obs_end[persons] + gap_after)
