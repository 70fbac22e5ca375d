"""What every audience's ``omopfl`` commands share: one console, JSON on stdout, table cells, common options.

Serves all command modules (:mod:`omopfl.cli_site`, :mod:`omopfl.cli_node`, :mod:`omopfl.cli_coordinator`,
:mod:`omopfl.cli_train`, :mod:`omopfl.cli_evaluate`, :mod:`omopfl.cli_demo`).  They import this module and
never :mod:`omopfl.cli`, the root that registers them, so the command line has no import cycle.  Error
rendering and exit codes are the root's (:func:`omopfl.cli.main`): a command raises an
:class:`~omopfl.errors.OmopflError` and never prints its own error line.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

if TYPE_CHECKING:
    import sqlalchemy as sa

    from omopfl.config import SiteConfig

__all__ = ["SiteOption", "StudyOption", "console", "emit_json", "fmt", "load_site", "print_validation",
           "quiet_flower", "site_connection"]

console = Console()
"""The one rich console of the command line (it writes to whatever ``sys.stdout`` is at the time)."""

SiteOption = Annotated[Path, typer.Option("--site", help="The site's adapter TOML.")]
StudyOption = Annotated[Path, typer.Option("--study", help="The study specification (study.toml).")]


def emit_json(payload: object) -> None:
    """``--json``: the payload on stdout, indented, anything not JSON as its ``str``."""
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")


def fmt(value: object) -> str:
    """A table cell: floats with 3 decimals, None as an empty cell."""
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)


def load_site(adapter: Path) -> SiteConfig:
    """:func:`omopfl.config.load_site`, imported when a command runs.

    The adapter parser brings the site policy and the model registry (numpy) with it; ``omopfl --help``
    needs none of that, so no command module imports :mod:`omopfl.config` at module level.
    """
    from omopfl.config import load_site as parse_adapter

    return parse_adapter(adapter)


@contextlib.contextmanager
def site_connection(adapter: Path) -> Iterator[tuple[SiteConfig, sa.Connection]]:
    """Parse an adapter, connect to its database, and always dispose of the engine."""
    from omopfl.db import connect, site_engine

    config = load_site(adapter)
    engine = site_engine(config)
    try:
        with connect(engine, what=f"site {config.name}") as conn:
            yield config, conn
    finally:
        engine.dispose()


def quiet_flower() -> None:
    """Keep Flower's own log lines out of an in-process run's output."""
    from omopfl.federation.local import quiet_flower_logs

    quiet_flower_logs()


def print_validation(name: str, result: dict) -> None:
    """One site's external-validation result (``omopfl evaluate``, at the site or ``--federated``)."""
    if result.get("withheld"):
        console.print(f"{name}: withheld ({result['reason']})")
    else:
        ci = result["auc_ci95"]
        console.print(f"{name}: {result['n']} persons, AUC {result['auc']} (95% CI {ci[0]}-{ci[1]}), "
                      f"AUPRC {result['auprc']}, Brier {result['brier']}, calibration slope "
                      f"{result['calibration_slope']}")
