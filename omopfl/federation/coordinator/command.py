"""``omopfl server --study study.toml``: the researcher's side of a federated run.

Starts a Flower SuperLink (its Fleet/Control HTTP API on ``host:port``; TLS when certificates are
given), waits for the sites' SuperNodes (``omopfl train --site ... --superlink HOST:PORT`` at each
site), runs the training app with ``flwr run --stream``, shows the run's progress as it comes
(a rich progress bar over rounds, plus every omopfl line of the ServerApp's log), then writes the
plots and the markdown report into the run directory and stops the SuperLink by PID.

The run directory (``--out``) is written by the ServerApp, which the SuperLink runs on this machine:
``model.npz``, ``scaler.json``, ``features.json``, ``stats.json``, ``metrics.json``/``.csv``,
``metrics.png``, ``report.md``, ``manifest.json`` (cohort hashes, study hash, file hashes), and
``checkpoint.json``/``.npz`` after every round, which ``--resume`` continues from.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omopfl.errors import ConfigError, FederationError
from omopfl.federation.coordinator.run_dir import check_resume
from omopfl.federation.run_config import app_pyproject, training_run_config

__all__ = ["ServerOptions", "serve_study"]

_ROUND = re.compile(r"omopfl round (\d+)/(\d+)")
_FAILURE = re.compile(r"\b\w*(Error|Failed|Exception): ")
_OURS = re.compile(r"\bomopfl( stats| round|:)")


@dataclass
class ServerOptions:
    """What ``omopfl server`` was asked for (see :func:`serve_study`)."""

    host: str = "0.0.0.0"
    port: int = 9092
    out: Path | None = None
    rounds: int | None = None
    strategy: str | None = None
    min_sites: int | None = None
    expected_sites: int | None = None
    wait_seconds: float = 300.0
    timeout: float = 600.0
    round_timeout: float = 600.0
    resume: bool = False
    audit: bool = False
    evaluate_on_train: bool = True
    tls: dict[str, Path] | None = None
    site_keys: list[Path] = field(default_factory=list)
    keep_logs: bool = False
    view: bool = False
    view_port: int = 8088
    extra_run_config: dict[str, Any] = field(default_factory=dict)


def serve_study(study: Path, options: ServerOptions, *, on_line: Callable[[str], None] | None = None,
                on_started: Callable[[int], None] | None = None, progress: bool = True,
                on_view: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Start the SuperLink, run the training app on the sites that connect, write the run directory.

    Parameters
    ----------
    study:
        The study file (the sites must have prepared their datasets for it: its hash is checked).
    options:
        :class:`ServerOptions`: where to listen, how many sites (``min_sites`` default: the study's
        ``[training] min_sites``; ``expected_sites`` default: ``min_sites``), bounded waits
        (``wait_seconds`` for SuperNodes, ``timeout`` per statistics query, ``round_timeout`` per
        round), ``resume``, TLS files ``{"ca", "cert", "key"}``.
    on_line:
        Called with every output line of ``flwr run --stream`` (default: omopfl's lines are printed).
    on_started:
        Called with the SuperLink's port once it listens (tests start SuperNodes then).
    on_view:
        With ``options.view``: called with the live run view's URL once it listens (127.0.0.1 only;
        :mod:`omopfl.federation.coordinator.run_view`).

    Returns
    -------
    dict
        The run's manifest (also ``<out>/manifest.json``) with ``runner`` timings.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from omopfl.federation import processes as deploy
    from omopfl.report import plot_metrics, write_report
    from omopfl.study import load_study

    spec = load_study(study)
    run_dir = Path(options.out or Path("runs") / spec.name).resolve()
    check_resume(run_dir, options.resume)
    min_sites = int(options.min_sites if options.min_sites is not None else spec.training.min_sites)
    if min_sites < 1:
        raise ConfigError("--min-sites must be at least 1")
    if options.site_keys and not options.tls:
        raise ConfigError("--site-key (SuperNode authentication) needs TLS: pass the --ssl-* files")
    expected = int(options.expected_sites if options.expected_sites is not None else min_sites)
    run_config = training_run_config(
        spec, run_dir, min_sites=min_sites, expected_sites=expected, audit=options.audit, rounds=options.rounds,
        strategy=options.strategy, resume=options.resume, wait_seconds=options.wait_seconds,
        timeout=options.timeout, round_timeout=options.round_timeout, evaluate_on_train=options.evaluate_on_train)
    run_config.update(options.extra_run_config)
    num_rounds = int(run_config["rounds"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "manifest.json").unlink(missing_ok=True)
    console = Console(stderr=True)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="omopfl-server-"))
    env = deploy.flower_env()
    env["FLWR_HOME"] = str(work / "flwr_home")
    procs = deploy.Processes(env, work)
    ok = False
    timings: dict[str, float] = {}
    bar = Progress(TextColumn("[bold]federated training"), BarColumn(), MofNCompleteColumn(), TextColumn("rounds"),
                   TimeElapsedColumn(), console=console, disable=not progress, transient=False)
    task = bar.add_task("rounds", total=num_rounds)
    failures: list[str] = []
    view = None
    if options.view:
        from omopfl.federation.coordinator.run_view import RunView

        (run_dir / "live.json").unlink(missing_ok=True)  # no stale state from an earlier run
        view = RunView(run_dir, port=options.view_port).start()
        console.print(f"live run view on {view.url} (this machine only; read-only; stops with the run)")
        if on_view is not None:
            on_view(view.url)

    def show(line: str) -> None:
        match = _ROUND.search(line)
        if match:
            bar.update(task, completed=int(match.group(1)))
        if on_line is not None:
            on_line(line)
        elif _OURS.search(line):
            bar.console.print(line[_OURS.search(line).start():], markup=False, highlight=False)
        elif "ERROR" in line or _FAILURE.search(line):
            bar.console.print(line.strip(), markup=False, highlight=False)
        if _FAILURE.search(line):
            failures.append(line.strip())

    try:
        port = deploy.start_superlink(procs, host=options.host, port=options.port, tls=options.tls,
                                      extra=["--enable-supernode-auth"] if options.site_keys else None)
        connect_host = "127.0.0.1" if options.host in ("0.0.0.0", "::", "") else options.host
        connection = deploy.write_connection(work / "flwr_home", f"{connect_host}:{port}",
                                             root_certificates=(options.tls or {}).get("ca"))
        for key in options.site_keys:
            deploy.register_site_key(key, connection, env)
        if options.site_keys:
            console.print(f"SuperNode authentication on: {len(options.site_keys)} site key(s) registered; "
                          "no other SuperNode can join")
        timings["start_superlink"] = round(time.perf_counter() - started, 3)
        console.print(f"SuperLink listening on {options.host}:{port}; waiting for {expected} site(s) "
                      f"(at least {min_sites}, at most {options.wait_seconds:.0f} s)")
        if on_started is not None:
            on_started(port)
        budget = (options.wait_seconds + 3 * options.timeout + (num_rounds + 1) * options.round_timeout + 300)
        t0 = time.perf_counter()
        with bar:
            try:
                deploy.flwr_run(work, app_pyproject("train"), connection, run_config, env, timeout=budget,
                                on_line=show)
            except FederationError as exc:
                if failures:  # the ServerApp's own message (server-side text; sites send fixed codes only)
                    raise FederationError(f"the run failed: {failures[-1][-300:]} (logs: {work})") from None
                raise exc
        timings["flwr_run"] = round(time.perf_counter() - t0, 3)
        ok = True
    finally:
        t0 = time.perf_counter()
        procs.stop()
        timings["stop"] = round(time.perf_counter() - t0, 3)
        if view is not None:
            if not ok:
                from omopfl.federation.coordinator.run_view import mark_failed

                mark_failed(run_dir, failures[-1][-300:] if failures else "the run stopped")
            view.stop()
        if ok and not options.keep_logs and (run_dir / "manifest.json").is_file():
            shutil.rmtree(work, ignore_errors=True)
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.is_file() and failures:  # flwr run may exit 0 when the ServerApp raised
        raise FederationError(f"the run failed: {failures[-1][-300:]} (logs: {work})")
    if not manifest_path.is_file():
        raise FederationError(f"the training ServerApp wrote no run directory at {run_dir} (logs: {work})")
    plot_metrics(run_dir)
    write_report(run_dir)
    manifest = json.loads(manifest_path.read_text())
    manifest["runner"] = {"mode": "server", "engine": f"deployment (SuperLink on {options.host}:{options.port})",
                          "seconds": round(time.perf_counter() - started, 3), "phases": timings}
    return manifest
