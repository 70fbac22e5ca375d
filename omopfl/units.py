"""Unit conversion factors from UCUM codes, through a maintained UCUM library.

``ucumvert`` parses UCUM codes (the ``concept_code`` of OMOP's UCUM vocabulary: ``mg/dL``,
``[lb_av]``, ``mm[Hg]``, ``10*3/uL``...) into ``pint`` quantities, and pint converts them. This
module turns that into what omopfl's SQL needs: for a unit and a target unit the pair
``(factor, offset)`` with ``target = factor * value + offset`` (an offset only for temperatures).

What stays data (omopfl's own, in :data:`UNITS` and :data:`MOLAR_MASSES`): the UCUM codes omopfl
offers per dimension (the candidates a site's rows are matched against; a code outside them counts
as an unknown unit, never converted silently), and the molar masses that connect mass and molar
concentrations of an analyte. Everything else is the library's.

Loading the UCUM grammar and pint's registry takes seconds, so the computed factors are cached in a
JSON file (``$XDG_CACHE_HOME/omopfl`` or ``~/.cache/omopfl``) keyed by the library versions and the
data above; a cache that cannot be written is only a slower start. Factors are rounded to 15
significant digits where that moves them by at most 4 ulps (pint's chain of float multiplications adds
a few: ``18.016000000000002`` becomes ``18.016``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Mapping
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path

from omopfl.atomic import write_json

__all__ = ["UNITS", "MOLAR_MASSES", "MOLAR_CONCENTRATIONS", "MASS_CONCENTRATIONS", "factor_table",
           "analyte_table", "convert"]

UNITS: dict[str, tuple[str, ...]] = {
    # dimension: UCUM codes, the canonical unit first
    "mass": ("kg", "g", "[lb_av]", "[oz_av]"),
    "length": ("cm", "m", "mm", "[in_i]", "[ft_i]"),
    "pressure": ("mm[Hg]", "kPa"),
    "temperature": ("Cel", "[degF]"),
    "mass_concentration": ("mg/dL", "mg/L", "g/L", "g/dL"),
    "molar_concentration": ("mmol/L", "umol/L", "mol/L"),
    "body_mass_index": ("kg/m2",),
}
"""The UCUM codes omopfl converts between, per dimension (canonical unit first)."""

MASS_CONCENTRATIONS = UNITS["mass_concentration"]
MOLAR_CONCENTRATIONS = ("mmol/L", "umol/L")

MOLAR_MASSES: dict[str, float] = {
    # g/mol; each reproduces the conventional clinical factor (mg/dL per mmol/L = M / 10)
    "glucose": 180.16,  # 18.016 mg/dL per mmol/L
    "creatinine": 10000.0 / 88.42,  # 88.42 umol/L per mg/dL (conventional; C4H7N3O is 113.12)
    "cholesterol": 386.7,  # 38.67 mg/dL per mmol/L
    "triglycerides": 885.7,  # 88.57 mg/dL per mmol/L (as triolein)
}
"""Molar masses (g/mol) that connect an analyte's mass and molar concentrations."""


def _digits(value: float) -> float:
    """``value`` at 15 significant digits when that is within 4 ulps (float noise), else as it is."""
    rounded = float(f"{value:.15g}")
    return rounded if abs(rounded - value) <= 4 * math.ulp(value) else value


@lru_cache(maxsize=1)
def _registry():  # ucumvert.PintUcumRegistry
    from ucumvert import PintUcumRegistry

    return PintUcumRegistry()


def convert(value: float, from_unit: str, to_unit: str, molar_mass: float | None = None) -> float:
    """``value`` in ``from_unit`` expressed in ``to_unit`` (pint through ucumvert; no cache).

    With ``molar_mass`` (g/mol) a molar and a mass concentration convert into each other.
    """
    ureg = _registry()
    source, target = ureg.from_ucum(from_unit), ureg.from_ucum(to_unit)
    quantity = ureg.Quantity(value * source.magnitude, source.units)  # 10*3/uL parses as 1.0 _10**3/uL
    if molar_mass is not None and quantity.check("[substance] / [length] ** 3") and \
            target.check("[mass] / [length] ** 3"):
        quantity = quantity * ureg.Quantity(molar_mass, "g/mol")
    elif molar_mass is not None and quantity.check("[mass] / [length] ** 3") and \
            target.check("[substance] / [length] ** 3"):
        quantity = quantity / ureg.Quantity(molar_mass, "g/mol")
    return float(quantity.to(target.units).magnitude / target.magnitude)


def _pair(from_unit: str, to_unit: str, molar_mass: float | None = None) -> tuple[float, float]:
    zero = convert(0.0, from_unit, to_unit, molar_mass)
    span = convert(1000.0, from_unit, to_unit, molar_mass) - zero  # a wide span: offsets cost no digits
    return _digits(span / 1000.0), _digits(zero) + 0.0


def _compute() -> dict[str, dict[str, list[float]]]:
    tables: dict[str, dict[str, list[float]]] = {}
    for dimension, codes in UNITS.items():
        tables[dimension] = {code: list(_pair(code, codes[0])) for code in codes}
    for analyte, mass in MOLAR_MASSES.items():
        codes = (*MASS_CONCENTRATIONS, *MOLAR_CONCENTRATIONS)
        tables["analyte:" + analyte] = {code: list(_pair(code, "mg/dL", mass)) for code in codes}
    return tables


def _cache_path() -> Path:
    key = json.dumps([version("ucumvert"), version("pint"), UNITS, MOLAR_MASSES], sort_keys=True)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "omopfl"
    return base / f"ucum-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


@lru_cache(maxsize=1)
def _tables() -> dict[str, dict[str, list[float]]]:
    path = _cache_path()
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    tables = _compute()
    with contextlib.suppress(OSError):
        write_json(path, tables, indent=None)
    return tables


def factor_table(dimension: str) -> Mapping[str, tuple[float, float]]:
    """``{code: (factor, offset)}`` into the dimension's canonical unit (the first of :data:`UNITS`)."""
    return {code: (float(f), float(o)) for code, (f, o) in _tables()[dimension].items()}


def analyte_table(analyte: str) -> Mapping[str, tuple[float, float]]:
    """``{code: (factor, offset)}`` of an analyte's mass and molar concentrations into mg/dL."""
    return {code: (float(f), float(o)) for code, (f, o) in _tables()["analyte:" + analyte].items()}
