"""``omopfl train``: one command, two audiences (the options of both are declared here, as --help shows them).

With ``--site ADAPTER --superlink HOST:PORT`` a site's operator serves that site as a Flower SuperNode
(:func:`omopfl.cli_node.serve_site_node`); with ``--simulate`` and/or ``--pooled`` a researcher or
coordinator trains on one machine (:func:`omopfl.cli_coordinator.train_here`).  This module only
routes; :mod:`omopfl.cli` registers :func:`train` on the root app.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from omopfl.cli_coordinator import train_here
from omopfl.cli_node import serve_site_node
from omopfl.errors import ConfigError

__all__ = ["train"]


def train(
    study: Annotated[Path | None, typer.Option("--study", help="The study (needed with --simulate).")] = None,
    site: Annotated[
        list[Path] | None, typer.Option("--site", help="Site adapter(s). With --superlink: the site this node serves.")
    ] = None,
    simulate: Annotated[
        bool, typer.Option("--simulate", help="Every site in adapters/ on this machine, same code path as deployment.")
    ] = False,
    pooled: Annotated[
        bool, typer.Option("--pooled", help="Centralized baseline on the pooled data (synthetic/test sites only); "
                                            "with --simulate, trained beside the federated run.")
    ] = False,
    superlink: Annotated[
        str | None, typer.Option(help="HOST:PORT of the SuperLink: serve --site as a Flower SuperNode.")
    ] = None,
    prepared: Annotated[Path, typer.Option(help="Folder of the prepared site datasets.")] = Path("data/prepared"),
    out: Annotated[Path | None, typer.Option(help="Run directory (default runs/<study name>).")] = None,
    mode: Annotated[str, typer.Option(help="--simulate engine: inprocess or deployment (loopback).")] = "inprocess",
    rounds: Annotated[int | None, typer.Option(help="Override the study's rounds.")] = None,
    strategy: Annotated[str | None, typer.Option(help="Override the server strategy (fedadam...).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run directory's last checkpoint.")] = False,
    min_sites: Annotated[
        int | None, typer.Option(help="Fewest sites a round may go on with (default: every site).")
    ] = None,
    round_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for a round's replies before dropping the silent sites.")
    ] = 600.0,
    root_certificates: Annotated[
        Path | None, typer.Option(help="CA certificate (PEM) of the SuperLink: TLS (the default needs it).")
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="No TLS to the SuperLink (loopback and testing only).")
    ] = False,
    auth_private_key: Annotated[
        Path | None, typer.Option(help="SuperNode authentication: this site's private key (OpenSSH, P-384).")
    ] = None,
    auth_public_key: Annotated[
        Path | None, typer.Option(help="Deprecated by Flower (derived from the private key); passed if given.")
    ] = None,
    runtime_port: Annotated[
        int | None, typer.Option(help="Port of the SuperNode's local Runtime API (default: a free one).")
    ] = None,
    stock_polling: Annotated[
        bool, typer.Option("--stock-polling", help="Keep Flower's stock SuperNode polling (3 s idle sleep).")
    ] = False,
    worker: Annotated[
        bool, typer.Option("--worker/--no-worker", help="Run train/evaluate in this long-lived process.")
    ] = True,
    max_wait_time: Annotated[
        float | None, typer.Option(help="SuperNode: give up after this many seconds without the SuperLink.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run manifest as JSON.")] = False,
) -> None:
    """Federated training: simulate all sites on one machine, or serve one site as a Flower SuperNode."""
    if superlink:
        serve_site_node(site, superlink, prepared, root_certificates=root_certificates, insecure=insecure,
                        keys=(auth_private_key, auth_public_key), runtime_port=runtime_port,
                        stock_polling=stock_polling, worker=worker, max_wait_time=max_wait_time)
        return
    if not (simulate or pooled):
        raise ConfigError(
            "omopfl train needs --simulate (all sites here), --pooled, or --site ADAPTER --superlink HOST:PORT"
        )
    train_here(study=study, sites=site, simulate=simulate, pooled=pooled, prepared=prepared, out=out, mode=mode,
               rounds=rounds, strategy=strategy, resume=resume, min_sites=min_sites, round_timeout=round_timeout,
               as_json=as_json)
