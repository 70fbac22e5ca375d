"""The researcher or coordinator: federated statistics, covariate discovery, training runs, the run view.

``omopfl stats``, ``omopfl covariates``, ``omopfl server``, ``omopfl view``, and the coordinator's side of
the two commands that serve two audiences: :func:`train_here` (``omopfl train --simulate/--pooled``,
declared in :mod:`omopfl.cli_train`) and :func:`evaluate_federated` (``omopfl evaluate --federated``,
declared in :mod:`omopfl.cli_evaluate`).  The coordinator sees what the sites release, never their data;
:mod:`omopfl.cli` registers the commands on the root app.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from omopfl.cli_output import StudyOption, console, emit_json, fmt, load_site, print_validation, quiet_flower
from omopfl.errors import ConfigError, FederationError

__all__ = ["covariates", "evaluate_federated", "print_stats", "print_training", "require_prepared", "server",
           "stats", "train_here", "view_run"]


# ---------------------------------------------------------------- stats
def stats(
    study: StudyOption,
    sites: Annotated[
        list[Path] | None, typer.Option("--site", help="Site adapters (default: every adapters/*.toml).")
    ] = None,
    prepared: Annotated[Path, typer.Option(help="Folder of the sites' prepared datasets.")] = Path("data/prepared"),
    out: Annotated[Path, typer.Option(help="Result JSON (global statistics).")] = Path("runs/stats.json"),
    audit: Annotated[
        Path | None, typer.Option(help="Also write every site reply exactly as the server received it.")
    ] = None,
    mode: Annotated[
        str, typer.Option(help="deployment (SuperLink + one SuperNode per site on loopback), inprocess, simulation.")
    ] = "deployment",
    superlink: Annotated[
        str | None, typer.Option(help="Use this Flower connection (SuperLink) instead of starting one.")
    ] = None,
    send_scaler: Annotated[bool, typer.Option(help="Send the global Scaler back to every site.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Federated statistics: global count, mean and std per feature, from per-site aggregates only."""
    from omopfl.federation.local import run_stats

    adapters = list(sites) if sites else sorted(Path("adapters").glob("*.toml"))
    if not adapters:
        raise ConfigError("no site adapters: pass --site adapters/<site>.toml (repeatable)")
    for adapter in adapters:
        load_site(adapter)  # fail early, naming the file, before any process starts
    if superlink is None:
        require_prepared(adapters, prepared)
    result = run_stats(study, adapters, prepared, mode=mode, superlink=superlink, out=out, audit=audit,
                       send_scaler=send_scaler)
    if as_json:
        emit_json(result)
    else:
        print_stats(result)
        console.print(f"result written to {out}")
    if result.get("global") is None:
        raise FederationError(f"no site contributed statistics (see {out} for each site's reason): "
                              "prepare the sites, approve the study there, or use a larger cohort")


# ---------------------------------------------------------------- covariates (issue 13b)
def covariates(
    study: StudyOption,
    sites: Annotated[
        list[Path] | None, typer.Option("--site", help="Site adapters (default: every adapters/*.toml).")
    ] = None,
    prepared: Annotated[Path, typer.Option(help="Folder of the sites' prepared datasets.")] = Path("data/prepared"),
    out: Annotated[Path, typer.Option(help="Covariate list written (CSV) for [covariates] list.")] = Path(
        "covariates.csv"),
    min_sites: Annotated[int, typer.Option(help="Keep covariates released by at least this many sites.")] = 2,
    min_persons: Annotated[
        int, typer.Option(help="Ask for covariates of at least this many persons (a site never goes below its "
                               "own min_cell_count).")
    ] = 0,
    mode: Annotated[str, typer.Option(help="inprocess, or deployment (SuperLink + SuperNodes on loopback).")] = (
        "deployment"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Federated covariate discovery: the covariate ids each site releases (held by >= its min_cell_count
    persons), kept when at least --min-sites sites release them, written as the study's covariate list."""
    from omopfl.federation.local import run_discovery

    adapters = list(sites) if sites else sorted(Path("adapters").glob("*.toml"))
    if not adapters:
        raise ConfigError("no site adapters: pass --site adapters/<site>.toml (repeatable)")
    for adapter in adapters:
        load_site(adapter)
    require_prepared(adapters, prepared)
    result = run_discovery(study, adapters, prepared, out=out, min_sites=min_sites, min_persons=min_persons,
                           mode=mode)
    if as_json:
        emit_json(result)
        return
    answered = result["sites"]["answered"]
    failed = ", ".join(f"{f['site'] or f['node']} {f['code']}" for f in result["sites"]["failed"])
    console.print("sites: " + ", ".join(f"{site} released {n}" for site, n in sorted(answered.items()))
                  + (f"; failed: {failed}" if failed else ""))
    console.print(f"{len(result['covariates'])} covariates released by >= {result['min_sites']} sites written to "
                  f"{out}; name it in the study: [covariates] list = \"{out.name}\"")


def require_prepared(adapters: list[Path], prepared: Path) -> None:
    """Refuse, before any process starts, a run where no site has a prepared dataset."""
    if not any((prepared / load_site(adapter).name / "manifest.json").is_file() for adapter in adapters):
        raise ConfigError(f"{prepared}: no prepared dataset for any of the {len(adapters)} site(s); "
                          "run omopfl prepare --site <adapter> --study <study> --out "
                          f"{prepared} first (or pass --prepared)")


def _failure_text(failure: dict) -> str:
    """``site: reason (code)`` for one entry of a statistics result's ``failed`` list."""
    from omopfl.federation import codec

    code = str(failure.get("code", ""))
    who = failure.get("site") or f"node {failure.get('node')}"
    return f"{who}: {codec.ERROR_TEXT.get(code, code)} ({code})"


def print_stats(result: dict) -> None:
    sites = result.get("sites", {})
    console.print(
        f"sites contributing: {', '.join(sites.get('contributing', [])) or 'none'}; "
        f"withheld (fewer than their min_cell_count): {', '.join(sites.get('withheld', [])) or 'none'}; "
        f"failed: {', '.join(_failure_text(f) for f in sites.get('failed', [])) or 'none'}"
    )
    for site, names in sorted((sites.get("suppressed") or {}).items()):
        console.print(f"{site} withheld (its release rule): {', '.join(names)}")
    table = Table(title="global statistics (merged from per-site moments)")
    for column in ("feature", "n", "mean", "std"):
        table.add_column(column, justify="right" if column != "feature" else "left")
    merged = result.get("global") or {}
    if not merged:
        return
    for name, n, mean, std in zip(merged.get("feature_names", []), merged.get("n", []), merged.get("mean", []),
                                  merged.get("std", []), strict=False):
        table.add_row(name, str(n), fmt(mean), fmt(std))
    console.print(table)


# ---------------------------------------------------------------- train on this machine
def train_here(*, study: Path | None, sites: list[Path] | None, simulate: bool, pooled: bool, prepared: Path,
               out: Path | None, mode: str, rounds: int | None, strategy: str | None, resume: bool,
               min_sites: int | None, round_timeout: float, as_json: bool) -> None:
    """``omopfl train --simulate`` and/or ``--pooled``: every site's prepared data trained on this machine."""
    if study is None:
        raise ConfigError("omopfl train --simulate/--pooled needs --study study.toml")
    from omopfl.study import load_study

    spec = load_study(study)
    adapters = list(sites) if sites else sorted(Path("adapters").glob("*.toml"))
    if not adapters:
        raise ConfigError("no site adapters: pass --site adapters/<site>.toml (repeatable)")
    for adapter in adapters:
        load_site(adapter)  # fail early, naming the file, before any process starts
    require_prepared(adapters, prepared)
    run_dir = out or Path("runs") / (spec.name if simulate else "pooled")
    pooled_result = None
    if pooled:
        from omopfl.pooled import train_pooled

        pooled_result = train_pooled(study, adapters, prepared, out_dir=run_dir, rounds=rounds)
        if not simulate:
            if as_json:
                emit_json(pooled_result)
                return
            weighted = pooled_result["metrics"]["site_weighted"]
            console.print(f"pooled baseline: AUC {fmt(weighted.get('auc'))} (site-weighted), "
                          f"{fmt(pooled_result['metrics']['pooled'].get('auc'))} over all test rows")
            return
    from omopfl.federation.local import run_training
    from omopfl.report import plot_metrics, write_report

    if mode == "inprocess":
        quiet_flower()
    manifest = run_training(study, adapters, prepared, mode=mode, out_dir=run_dir, rounds=rounds,
                            strategy=strategy, resume=resume, min_sites=min_sites, round_timeout=round_timeout)
    plot_metrics(run_dir)
    write_report(run_dir)
    if as_json:
        emit_json(manifest)
        return
    print_training(manifest, run_dir, pooled_result)




def print_training(manifest: dict, run_dir: Path, pooled_result: dict | None = None) -> None:
    final = manifest.get("final") or {}
    training = manifest.get("training", {})
    from omopfl.report import NO_EVALUATION

    evaluation = (f"AUC {fmt(final.get('eval_auc'))}, accuracy {fmt(final.get('eval_accuracy'))}"
                  if final.get("eval_auc") is not None else NO_EVALUATION)
    console.print(f"trained {manifest.get('model', {}).get('kind')} with {training.get('strategy')} over "
                  f"{len(manifest.get('sites', []))} sites, {training.get('rounds')} rounds: {evaluation}")
    for dropped in manifest.get("dropped", []):
        console.print(f"[yellow]site {dropped['site']} dropped in round {dropped['round']}: {dropped['reason']}")
    if manifest.get("resumed_from_round"):
        console.print(f"resumed after round {manifest['resumed_from_round']}")
    if pooled_result is not None:
        weighted = pooled_result["metrics"]["site_weighted"]
        console.print(f"pooled baseline on the same split: AUC {fmt(weighted.get('auc'))} (site-weighted)")
    console.print(f"run directory {run_dir} (model.npz, metrics.json/csv, metrics.png, report.md)")


# ---------------------------------------------------------------- server / view
def server(
    study: StudyOption,
    host: Annotated[str, typer.Option(help="Address the SuperLink listens on (SuperNodes connect here).")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="Port of the SuperLink's HTTP API.", min=1, max=65535)] = 9092,
    out: Annotated[Path | None, typer.Option(help="Run directory (default runs/<study name>).")] = None,
    rounds: Annotated[int | None, typer.Option(help="Override the study's rounds.")] = None,
    strategy: Annotated[str | None, typer.Option(help="Override the server strategy (fedadam...).")] = None,
    min_sites: Annotated[
        int | None, typer.Option(help="Fewest sites to start and go on with (default: the study's min_sites).")
    ] = None,
    sites: Annotated[
        int | None, typer.Option("--sites", help="Sites to wait for before starting (default: --min-sites).")
    ] = None,
    wait_seconds: Annotated[float, typer.Option(help="At most this long to wait for the sites.")] = 300.0,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the replies of one statistics query.")] = 600.0,
    round_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for a round's replies before dropping the silent sites.")
    ] = 600.0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run directory's last checkpoint.")] = False,
    audit: Annotated[bool, typer.Option(help="Also write every site reply as received (audit.json).")] = False,
    ssl_ca_certfile: Annotated[Path | None, typer.Option(help="TLS: CA certificate (PEM).")] = None,
    ssl_certfile: Annotated[Path | None, typer.Option(help="TLS: the SuperLink's certificate (PEM).")] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="TLS: the SuperLink's private key (PEM).")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="No TLS (loopback and testing only).")] = False,
    site_key: Annotated[
        list[Path] | None, typer.Option("--site-key", help="A site's SuperNode public key (OpenSSH, P-384): only "
                                                         "SuperNodes holding a registered key may join (repeatable).")
    ] = None,
    view: Annotated[
        bool, typer.Option("--view", help="Serve a live read-only view of the run on http://127.0.0.1:VIEW_PORT/ "
                                          "(this machine only).")
    ] = False,
    view_port: Annotated[int, typer.Option(help="Port of the live run view (--view).", min=0, max=65535)] = 8088,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run manifest as JSON.")] = False,
) -> None:
    """Coordinate a federated run: start the SuperLink, train with the sites' SuperNodes, write the run dir."""
    from omopfl.federation.coordinator.command import ServerOptions, serve_study

    tls_files = {"ca": ssl_ca_certfile, "cert": ssl_certfile, "key": ssl_keyfile}
    given = {k: v for k, v in tls_files.items() if v is not None}
    if given and len(given) != 3:
        raise ConfigError("TLS needs --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile together")
    if not given and not insecure:
        raise ConfigError("omopfl server needs TLS files (--ssl-ca-certfile, --ssl-certfile, --ssl-keyfile) or "
                          "--insecure (loopback and testing only)")
    for path in [*given.values(), *(site_key or [])]:
        if not path.is_file():
            raise ConfigError(f"{path}: file not found")
    options = ServerOptions(host=host, port=port, out=out, rounds=rounds, strategy=strategy, min_sites=min_sites,
                            expected_sites=sites, wait_seconds=wait_seconds, timeout=timeout,
                            round_timeout=round_timeout, resume=resume, audit=audit,
                            tls={k: Path(v) for k, v in given.items()} if given else None,
                            site_keys=list(site_key or []), view=view, view_port=view_port)
    manifest = serve_study(study, options)
    if as_json:
        emit_json(manifest)
        return
    from omopfl.study import load_study

    print_training(manifest, out or Path("runs") / load_study(study).name)


def view_run(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (written by omopfl server or omopfl train).")],
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.", min=0, max=65535)] = 8088,
) -> None:
    """Serve the read-only run view of a run directory on http://127.0.0.1:PORT/ until Ctrl-C."""
    from omopfl.federation.coordinator.run_view import RunView

    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: run directory not found")
    view = RunView(run_dir, port=port)
    console.print(f"run view of {run_dir} on {view.url} (this machine only; Ctrl-C to stop)")
    view.serve_forever()


# ---------------------------------------------------------------- evaluate --federated
def evaluate_federated(run: Path, sites: list[Path], prepared: Path, rows: str, out: Path | None, simulate: bool,
                       superlink: str | None, timeout: float, as_json: bool) -> None:
    """``--federated``: the coordinator sends the run's model; every approved site replies with its result."""
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
            print_validation(name, site_result)
        if result["refused"]:
            console.print(f"[yellow]not validated: {codec.refusal_summary(result['refused'])}")
        console.print(f"federated_validation.json, federated_validation.md and one folder per site in {folder}")
    if not result["sites"]:
        raise FederationError("no site validated the model: " + (codec.refusal_summary(result["refused"])
                                                                  or "no site connected"))
