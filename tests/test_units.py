"""UCUM conversion factors through ucumvert + pint (omopfl.units), and their cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from omopfl import units


def test_factors_are_the_librarys() -> None:
    assert units.convert(98.6, "[degF]", "Cel") == pytest.approx(37.0, abs=1e-12)
    assert units.convert(1.0, "10*3/uL", "10*9/L") == pytest.approx(1.0, rel=1e-12)  # platelets, WBC
    assert units.convert(5.5, "mmol/L", "mg/dL", units.MOLAR_MASSES["glucose"]) == pytest.approx(99.088, rel=1e-12)
    assert units.convert(99.088, "mg/dL", "mmol/L", units.MOLAR_MASSES["glucose"]) == pytest.approx(5.5, rel=1e-12)
    assert units.convert(120.0, "mm[Hg]", "kPa") == pytest.approx(15.9987, rel=1e-5)
    temperature = units.factor_table("temperature")
    assert temperature["[degF]"] == pytest.approx((5 / 9, -160 / 9), rel=1e-13)
    assert units.analyte_table("glucose")["mmol/L"] == (18.016, 0.0)  # float noise rounded away
    assert units.factor_table("mass")["[lb_av]"] == (0.45359237, 0.0)


def test_a_unit_ucum_does_not_know_is_refused_by_the_library() -> None:
    from ucumvert import InvalidUcumError

    with pytest.raises((InvalidUcumError, ValueError, KeyError, AttributeError)):
        units.convert(1.0, "mg/dL/", "g/L")


def test_the_cache_is_written_once_and_equals_a_fresh_computation(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    code = "import json, omopfl.units as u; print(json.dumps(u._tables()))"
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    files = list((tmp_path / "omopfl").glob("ucum-*.json"))
    assert len(files) == 1
    # a second process reads the file and never loads the UCUM grammar
    code2 = ("import json, sys, omopfl.units as u; t = u._tables(); "
             "print(json.dumps(t)); print('ucumvert' in sys.modules)")
    second = subprocess.run([sys.executable, "-c", code2], env=env, capture_output=True, text=True, check=True)
    tables, loaded = second.stdout.strip().splitlines()
    assert json.loads(first.stdout) == json.loads(tables) == units._compute() and loaded == "False"
