"""The example studies and cohort definitions omopfl ships, in a checkout and in an installed wheel.

The wheel carries the checkout's ``examples/`` and ``cohorts/`` folders as ``omopfl/bundled/examples``
and ``omopfl/bundled/cohorts`` (see ``[tool.setuptools]`` in pyproject.toml), with the same relative
layout, so a study's ``../../cohorts/...`` paths resolve in both places.  ``omopfl demo`` uses
:func:`example_study` by default; ``omopfl examples --out DIR`` copies both folders for editing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from omopfl.errors import ConfigError

__all__ = ["resource_root", "example_study", "example_names", "copy_examples"]

_PACKAGE = Path(__file__).resolve().parent


def resource_root() -> Path:
    """The folder holding ``examples/`` and ``cohorts/``: the wheel's ``omopfl/bundled`` or the checkout."""
    bundled = _PACKAGE / "bundled"
    if (bundled / "examples").is_dir():
        return bundled
    checkout = _PACKAGE.parent
    if (checkout / "examples").is_dir() and (checkout / "cohorts").is_dir():
        return checkout
    raise ConfigError("omopfl's example studies are missing from this installation (reinstall omopfl)")


def example_names() -> list[str]:
    """The example studies shipped (folders of ``examples/`` holding a ``study.toml``)."""
    root = resource_root() / "examples"
    return sorted(p.parent.name for p in root.glob("*/study.toml"))


def example_study(name: str = "t2dm_hf") -> Path:
    """The path of a shipped example study (``examples/<name>/study.toml``)."""
    path = resource_root() / "examples" / name / "study.toml"
    if not path.is_file():
        raise ConfigError(f"no example study {name!r}; shipped: {', '.join(example_names())}")
    return path


def copy_examples(out: Path) -> list[Path]:
    """Copy ``examples/`` and ``cohorts/`` into ``out`` (refuses to overwrite); returns the study files."""
    root = resource_root()
    out = Path(out)
    for name in ("examples", "cohorts"):
        if (out / name).exists():
            raise ConfigError(f"{out / name} already exists: choose another --out or remove it")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("examples", "cohorts"):
        shutil.copytree(root / name, out / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return sorted((out / "examples").glob("*/study.toml"))
