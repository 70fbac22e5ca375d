"""``omopfl evaluate``: a trained run applied to one site's prepared data, at that site.

The data engineer runs it at the site; the result folder holds only what the site's release rule
allows (:mod:`omopfl.plp_metrics`), so it can be shared with the study's coordinator.  With
``--federated`` the coordinator runs it instead: the model goes to every site that approved the
study (:mod:`omopfl.federation.coordinator.validation`), each site computes the same result at the site,
and the released results come back (``federated_validation.json``/``.md`` and one folder per site).
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
        _federated(run, site or [], prepared, rows, out, simulate, superlink, timeout, as_json)
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
    _print_site(config.name, result)
    console.print(f"validation.json, validation.md, roc.png and calibration.png in {folder}")


def _print_site(name: str, result: dict) -> None:
    if result.get("withheld"):
        console.print(f"{name}: withheld ({result['reason']})")
    else:
        ci = result["auc_ci95"]
        console.print(f"{name}: {result['n']} persons, AUC {result['auc']} (95% CI {ci[0]}-{ci[1]}), "
                      f"AUPRC {result['auprc']}, Brier {result['brier']}, calibration slope "
                      f"{result['calibration_slope']}")


def _federated(run: Path, sites: list[Path], prepared: Path, rows: str, out: Path | None, simulate: bool,
               superlink: str | None, timeout: float, as_json: bool) -> None:
    """``--federated``: the coordinator sends the run's model; every approved site replies with its result."""
    from omopfl.config import load_site
    from omopfl.errors import ConfigError, FederationError
    from omopfl.external_validation import write_validation, write_validation_report
    from omopfl.federation import codec
    from omopfl.federation.local import run_validation

    if simulate == (superlink is not None):
        raise ConfigError("omopfl evaluate --federated needs --simulate (with --site ADAPTER for each site) "
                          "or --superlink CONNECTION")
    for adapter in sites:
        load_site(adapter)  # fail early, naming the file
    folder = out or run / "validation"
    result = run_validation(run, sites, prepared, out=folder / "federated_validation.json",
                            mode="inprocess" if simulate else "deployment", superlink=superlink, rows=rows,
                            timeout=timeout)
    for name, site_result in sorted(result["sites"].items()):
        write_validation(site_result, folder / name)
    write_validation_report(result, folder / "federated_validation.md")
    if as_json:
        console.print_json(json.dumps(result))
    else:
        for name, site_result in sorted(result["sites"].items()):
            _print_site(name, site_result)
        if result["refused"]:
            console.print(f"[yellow]not validated: {codec.refusal_summary(result['refused'])}")
        console.print(f"federated_validation.json, federated_validation.md and one folder per site in {folder}")
    if not result["sites"]:
        raise FederationError("no site validated the model: " + (codec.refusal_summary(result["refused"])
                                                                  or "no site connected"))


def register(app: typer.Typer) -> None:
    """Add ``evaluate`` to the top-level commands."""
    app.command("evaluate")(evaluate)
