"""Lab rows (``measurement``) of one chunk of synthetic persons, in each site's units, and their truth.

Part of the synthetic generator (:mod:`omopfl.synth`).  Values are drawn around each person's latent
level (:attr:`omopfl.synth.people.People.latent`) and stored in the site's units with the
conversions of :data:`omopfl.vocab.LABS`; some values are NULL, as the site profile says.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from omopfl import vocab
from omopfl.synth.concepts import CONCEPT_CODES, LAB_TYPE
from omopfl.synth.people import LAB_WINDOW_DAYS
from omopfl.synth.rows import ChunkContext, RowBlocks

__all__ = ["LabRows"]

_LAB_NOISE = {"hba1c": 0.15, "glucose": 8.0, "creatinine": 0.05, "ldl": 6.0, "bmi": 0.3, "weight": 1.0,
              "height": 0.5, "sbp": 7.0}


class LabRows:
    """The lab rows of one chunk, with what the site's truth needs from them.

    Attributes
    ----------
    null_values:
        Rows with NULL ``value_as_number``, per lab key of :data:`omopfl.vocab.LABS`.
    units_seen:
        Unit concept ids written, per lab key.
    """

    def __init__(self, ctx: ChunkContext) -> None:
        self.ctx = ctx
        self.null_values: dict[str, int] = {key: 0 for key in vocab.LABS}
        self.units_seen: dict[str, set[int]] = {key: set() for key in vocab.LABS}
        self._glucose_rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def _lab_rows(self, rows: RowBlocks, key: str, persons: np.ndarray, days: np.ndarray,
                  canonical: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Add lab rows in the site's units; return (stored value, unit concept id)."""
        rng, p = self.ctx.rng, self.ctx.profile
        lab = vocab.LABS[key]
        if key == "glucose":
            units = np.array([u for u, _ in p.glucose_units])
            unit = rng.choice(units, size=len(persons), p=np.array([s for _, s in p.glucose_units]))
        else:
            fixed = {"hba1c": p.hba1c_unit, "creatinine": p.creatinine_unit, "ldl": p.ldl_unit}.get(
                key, lab.canonical_unit)
            unit = np.full(len(persons), fixed)
        value = np.empty(len(persons))
        for unit_id in np.unique(unit):
            a, b = lab.conversions[int(unit_id)]
            mask = unit == unit_id
            value[mask] = np.round(a * canonical[mask] + b, lab.decimals[int(unit_id)])
            self.units_seen[key].add(int(unit_id))
        null = rng.random(len(persons)) < p.null_value_share
        value[null] = np.nan
        self.null_values[key] += int(null.sum())
        rows.add(persons, measurement_concept_id=lab.concept_id, measurement_date=days, value_as_number=value,
                 unit_concept_id=unit, measurement_source_value=CONCEPT_CODES[lab.concept_id],
                 unit_source_value=pd.Series(unit).map(vocab.UNITS).to_numpy(dtype=object))
        return value, unit

    def measurements(self) -> pd.DataFrame:
        """Pre-index, follow-up and background values of every lab of :data:`omopfl.vocab.LABS`, and planted rows."""
        rng, p, n, pp = self.ctx.rng, self.ctx.profile, self.ctx.n, self.ctx.people
        obs_start, obs_end, t2dm, target, index, latent = (pp.obs_start, pp.obs_end, pp.t2dm, pp.target, pp.index,
                                                           pp.latent)
        rows = RowBlocks()
        diabetic = np.flatnonzero(t2dm)
        for key in vocab.LABS:
            # Pre-index values of diabetic persons: up to three, in disjoint 121-day bands before the index date.
            has = rng.random(len(diabetic)) >= p.lab_missing
            k = rng.integers(1, 4, len(diabetic)) * has
            mp = np.repeat(diabetic, k)
            band = np.arange(len(mp)) - np.repeat(np.cumsum(k) - k, k)
            offset = 1 + band * 121 + rng.integers(0, 121, len(mp))
            days = np.maximum(index[mp] - offset, obs_start[mp])
            canonical = latent[key][mp] + rng.normal(0.0, _LAB_NOISE[key], len(mp))
            value, unit = self._lab_rows(rows, key, mp, days, canonical)
            if key == "glucose":
                keep = target[mp] & ~np.isnan(value)
                to_mg = np.where(unit[keep] == 8840, value[keep], value[keep] * 18.016)
                self._glucose_rows.append((mp[keep], offset[keep], to_mg))
            # Follow-up HbA1c and glucose after the index date.
            if key in ("hba1c", "glucose"):
                k2 = rng.integers(0, 3, len(diabetic))
                fp = np.repeat(diabetic, k2)
                days = index[fp] + rng.integers(1, LAB_WINDOW_DAYS, len(fp))
                self._lab_rows(rows, key, fp, days, latent[key][fp] + rng.normal(0.0, _LAB_NOISE[key], len(fp)))
            # Background values of non-diabetic persons.
            share = 0.5 if key in ("bmi", "weight", "height", "sbp") else 0.3
            bp = np.flatnonzero(~t2dm & (rng.random(n) < share))
            days = self.ctx.uniform(obs_start[bp], obs_end[bp])
            self._lab_rows(rows, key, bp, days, latent[key][bp] + rng.normal(0.0, _LAB_NOISE[key], len(bp)))
        outside = self.ctx.outside_persons("measurement")
        rows.add(outside, measurement_concept_id=3025315,
                 measurement_date=self.ctx.outside_day(outside),
                 value_as_number=np.round(latent["weight"][outside], 1), unit_concept_id=9529,
                 measurement_source_value=CONCEPT_CODES[3025315], unit_source_value="kg")
        unmapped = self.ctx.unmapped_persons("measurement")
        rows.add(unmapped, measurement_concept_id=0,
                 measurement_date=self.ctx.uniform(obs_start[unmapped], obs_end[unmapped]),
                 value_as_number=np.round(latent["glucose"][unmapped] * 1.1), unit_concept_id=8840,
                 measurement_source_value="POC-GLU", unit_source_value="mg/dL")
        frame, _ = rows.build("measurement_id", self.ctx.ids["measurement"], self.ctx.first_person_id,
                              "measurement_date", ("measurement_date",))
        self.ctx.next_ids("measurement", len(frame))
        frame["measurement_type_concept_id"] = LAB_TYPE
        return frame

    def glucose_moments(self) -> tuple[int, float, float]:
        """(n, mean, M2) of the latest non-NULL pre-index glucose (mg/dL) per target person."""
        if not self._glucose_rows:
            return (0, 0.0, 0.0)
        person = np.concatenate([r[0] for r in self._glucose_rows])
        offset = np.concatenate([r[1] for r in self._glucose_rows])
        value = np.concatenate([r[2] for r in self._glucose_rows])
        order = np.lexsort((offset, person))
        _, first = np.unique(person[order], return_index=True)
        last = value[order][first]
        if len(last) == 0:
            return (0, 0.0, 0.0)
        mean = float(last.mean())
        return (len(last), mean, float(((last - mean) ** 2).sum()))
