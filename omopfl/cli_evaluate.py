"""``omopfl evaluate``: a trained run applied to one site's prepared data, at that site.

The data engineer runs it at the site; the result folder holds only what the site's release rule
allows (:mod:`omopfl.plp_metrics`), so it can be shared with the study's coordinator.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()


def evaluate(
    run: Annotated[Path, typer.Option("--run", help="A finished run directory (model.npz, scaler.json, manifest).")],
    site: Annotated[Path, typer.Option("--site", help="The site adapter (TOML) whose prepared data is scored.")],
    prepared: Annotated[Path, typer.Option(help="Folder of the sites' prepared datasets.")] = Path("data/prepared"),
    rows: Annotated[str, typer.Option(help="all (a site that never trained) or test (the study's test split).")]
    = "all",
    out: Annotated[Path | None, typer.Option(help="Result folder (default: <run>/validation/<site>).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """External validation: AUC (95% CI), AUPRC, Brier, calibration, thresholds, demographics, plots."""
    from omopfl.config import load_site
    from omopfl.external_validation import load_run, validate_site, write_validation
    from omopfl.prepare import load_prepared

    config = load_site(site)
    trained = load_run(run)
    dataset = load_prepared(prepared / config.name)
    result = validate_site(trained, dataset, int(config.min_cell_count), rows)
    folder = write_validation(result, out or run / "validation" / config.name)
    if as_json:
        console.print_json(json.dumps(result))
        return
    if result.get("withheld"):
        console.print(f"{config.name}: withheld ({result['reason']})")
    else:
        ci = result["auc_ci95"]
        console.print(f"{config.name}: {result['n']} persons, AUC {result['auc']} (95% CI {ci[0]}-{ci[1]}), "
                      f"AUPRC {result['auprc']}, Brier {result['brier']}, calibration slope "
                      f"{result['calibration_slope']}")
    console.print(f"validation.json, validation.md, roc.png and calibration.png in {folder}")


def register(app: typer.Typer) -> None:
    """Add ``evaluate`` to the top-level commands."""
    app.command("evaluate")(evaluate)
