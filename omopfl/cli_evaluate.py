"""``omopfl evaluate``: one command, two audiences; a trained run applied to sites' prepared data.

The site's data engineer runs it at the site (this module does that part): the result folder holds only
what the site's release rule allows (:mod:`omopfl.plp_metrics`), so it can be shared with the study's
coordinator.  With ``--federated`` the coordinator runs it instead
(:func:`omopfl.cli_coordinator.evaluate_federated`): the model goes to every site that approved the study
(:mod:`omopfl.federation.coordinator.validation`), each site computes the same result at the site, and
the released results come back (``federated_validation.json``/``.md`` and one folder per site).
:mod:`omopfl.cli` registers :func:`evaluate` on the root app.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from omopfl.cli_coordinator import evaluate_federated
from omopfl.cli_output import console, print_validation

__all__ = ["evaluate"]


def evaluate(
    run: Annotated[Path, typer.Option("--run", help="A finished run directory (model.npz, scaler.json, manifest).")],
    site: Annotated[list[Path] | None, typer.Option(
        "--site", help="The site adapter (TOML) whose prepared data is scored; with --federated --simulate, "
        "repeat it for each site.")] = None,
    prepared: Annotated[Path, typer.Option(help="Folder of the sites' prepared datasets.")] = Path("data/prepared"),
    rows: Annotated[str, typer.Option(help="all (a site that never trained) or test (the study's test split).")]
    = "all",
    out: Annotated[Path | None, typer.Option(help="Result folder (default: <run>/validation/<site>, or "
                                                  "<run>/validation with --federated).")] = None,
    federated: Annotated[bool, typer.Option("--federated", help="Send the model to the sites (coordinator): each "
                                            "approved site validates it on its own data and releases the result.")]
    = False,
    simulate: Annotated[bool, typer.Option("--simulate", help="--federated: run every --site's ClientApp here.")]
    = False,
    superlink: Annotated[str | None, typer.Option(help="--federated: the SuperLink connection (Flower "
                                                       "configuration) whose SuperNodes run at the sites.")] = None,
    timeout: Annotated[float, typer.Option(help="--federated: seconds to wait for the sites' replies.")] = 600.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """External validation: AUC (95% CI), AUPRC, Brier, calibration, thresholds, demographics, plots."""
    from omopfl.config import load_site
    from omopfl.errors import ConfigError
    from omopfl.external_validation import load_run, validate_site, write_validation
    from omopfl.prepare import load_prepared

    if federated:
        evaluate_federated(run, site or [], prepared, rows, out, simulate, superlink, timeout, as_json)
        return
    if simulate or superlink:
        raise ConfigError("--simulate and --superlink go with --federated")
    if not site or len(site) != 1:
        raise ConfigError("omopfl evaluate --site takes one adapter (the site this runs at); "
                          "use --federated to validate at several sites")
    config = load_site(site[0])
    trained = load_run(run)
    dataset = load_prepared(prepared / config.name)
    result = validate_site(trained, dataset, int(config.min_cell_count), rows)
    folder = write_validation(result, out or run / "validation" / config.name)
    if as_json:
        console.print_json(json.dumps(result))
        return
    print_validation(config.name, result)
    console.print(f"validation.json, validation.md, roc.png and calibration.png in {folder}")
