"""Federated runs on one machine: every site's ClientApp and the coordinator's ServerApp.

Statistics (:func:`run_stats`), training (:func:`run_training`) and federated external validation
(:func:`run_validation`) run here the same way: in process, or as a loopback deployment.

``"deployment"``
    Flower's Deployment Engine on loopback: one ``flower-superlink --insecure`` and one site node per
    adapter (``omopfl train --site ... --superlink ...``: Flower's SuperNode with omopfl's SuperExec) as
    subprocesses on free localhost ports, then ``flwr run <app> omopfl --run-config <file> --stream``.
    Every process is started in its own session and stopped by its PID (its process group) in a
    ``finally``.  With ``superlink=<connection name>`` nothing is started: the run goes to that
    SuperLink connection of the user's Flower configuration, whose SuperNodes already run at the sites
    (``result-path`` then names a file on the SuperLink's machine).
``"simulation"`` (statistics)
    Flower's Simulation Engine (``flwr.simulation.run_simulation``) runs ClientApps only through
    its Ray backend, and its virtual nodes get no node config but ``partition-id``.  So this mode runs
    the loopback deployment and says so in the result (``runner.note``).
``"inprocess"``
    No network and no subprocess: the same ``ServerApp`` and ``ClientApp`` objects, connected by
    :class:`InProcessGrid`, which passes every message through Flower's protobuf serialization
    (what would go on the wire) and calls the ClientApp as a SuperNode would.  Fast; for tests
    and development.

The statistics result (also written to ``out``) is the ServerApp's (see
:func:`omopfl.federation.coordinator.statistics.federated_statistics`) plus ``runner`` (mode, engine,
seconds).  Training writes a run directory (``out_dir``): ``model.npz``, ``scaler.json``,
``features.json``, ``stats.json``, ``metrics.json`` / ``metrics.csv`` (per round: sites, aggregated train
loss, evaluate loss/auc/accuracy/f1/kappa of the round's global model, n, seconds, bytes),
``checkpoint.json``/``.npz`` (last completed round), ``manifest.json`` (study name and hash, cohort
definition hashes, model and training spec, sites, dropped sites, file sha256s, timings, bytes) and,
when ``audit`` is on, ``audit.json`` (every site reply as received).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from omopfl.config import load_site
from omopfl.errors import ConfigError, FederationError
from omopfl.federation import codec
from omopfl.federation import processes as deploy
from omopfl.federation import run_config as schema
from omopfl.federation.coordinator.run_dir import check_resume
from omopfl.federation.flower_internals import InProcessGrid, superlink_task_identity
from omopfl.study import load_study

__all__ = ["run_stats", "run_training", "run_validation", "run_discovery", "run_inprocess", "run_deployment",
           "deploy_in_workdir", "InProcessGrid", "train_inprocess", "FederationError", "MODES", "TRAIN_MODES",
           "quiet_flower_logs"]

MODES = ("simulation", "deployment", "inprocess")
"""Modes of :func:`run_stats`."""
TRAIN_MODES = ("inprocess", "deployment")
"""Modes of :func:`run_training` and :func:`run_validation`."""

_log = logging.getLogger("omopfl.federation")

FLOWER_ENV = deploy.FLOWER_ENV


# --------------------------------------------------------------------------------------------
# modes
# --------------------------------------------------------------------------------------------


def run_inprocess(server_app: Any, adapters: list[Path], prepared_dir: Path, run_config: dict[str, Any], *,
                  grid_class: Any = None) -> None:
    """Run a ServerApp (statistics, training, discovery, validation) over the sites' ClientApps in this process.

    One :class:`InProcessGrid` (or ``grid_class``, same signature) node per adapter, each with the node
    config a SuperNode would have; the ServerApp gets a Context with ``run_config``.  The one in-process
    runner of every app (``omopfl stats``/``train``/``covariates``/``evaluate --federated`` on one machine).
    """
    from flwr.app import Context, RecordDict

    from omopfl.federation.site import app as site_app

    grid = (grid_class or InProcessGrid)(site_app.app, [{"site-config": str(a), "prepared-dir": str(prepared_dir)}
                                                        for a in adapters], run_config)
    context = Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    with superlink_task_identity(grid.run.run_id):
        server_app(grid, context)


def run_deployment(adapters: list[Path], prepared_dir: Path, run_config: dict[str, Any], superlink: str | None,
                    work: Path, run_timeout: float, timings: dict[str, float], *,
                    app_pyproject: str | None = None, tuned: bool = True) -> str:
    """Run a Flower app with ``flwr run``: on a loopback SuperLink with one SuperNode per site started
    through ``omopfl train --site ... --superlink ...`` (``superlink=None``) or on an existing
    connection of the user's Flower configuration; every process stopped by PID.

    ``app_pyproject`` is the app's ``pyproject.toml`` (default: the statistics app); ``tuned=False``
    starts the SuperNodes with Flower's stock polling (for before/after figures).
    """
    env = deploy.flower_env(tuned=tuned)
    procs = deploy.Processes(env, work)
    connection = superlink
    t0 = time.perf_counter()
    try:
        if superlink is None:
            env["FLWR_HOME"] = str(work / "flwr_home")
            port = deploy.start_superlink(procs)
            connection = deploy.write_connection(work / "flwr_home", f"127.0.0.1:{port}")
            for i, adapter in enumerate(adapters):
                deploy.start_site_node(procs, adapter, f"127.0.0.1:{port}", prepared_dir, name=f"supernode_{i}",
                                       tuned=tuned)
        timings["start_processes"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        deploy.flwr_run(work, app_pyproject or schema.app_pyproject("stats"), str(connection), run_config, env,
                        timeout=run_timeout)
        timings["flwr_run"] = round(time.perf_counter() - t0, 3)
    finally:
        t0 = time.perf_counter()
        procs.stop()
        timings["stop_processes"] = round(time.perf_counter() - t0, 3)
    return "deployment (loopback SuperLink + SuperNodes)" if superlink is None else f"deployment ({superlink})"



def _site_adapters(adapters: Iterable[str | Path], missing: str, *, check_names: bool = True) -> list[Path]:
    """The adapters as absolute paths; a ConfigError (``missing``) if there are none, or if two name the same
    site (``check_names=False``: the adapters are not read, e.g. for sites behind an existing SuperLink)."""
    resolved = [Path(a).resolve() for a in adapters]
    if not resolved:
        raise ConfigError(missing)
    names = [load_site(a).name for a in resolved] if check_names else []
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"two adapters name the same site: {duplicates[0]}")
    return resolved


def deploy_in_workdir(prefix: str, keep_logs: bool, adapters: list[Path], prepared_dir: Path,
                       run_config: dict[str, Any], superlink: str | None, run_timeout: float,
                       timings: dict[str, float], **options: Any) -> str:
    """:func:`run_deployment` in a new temporary working folder, deleted after a successful run unless
    ``keep_logs`` (a failed run keeps it: its Flower logs say why)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    engine = run_deployment(adapters, prepared_dir, run_config, superlink, work, run_timeout, timings, **options)
    if not keep_logs:
        shutil.rmtree(work, ignore_errors=True)
    return engine


def run_stats(
    study: Path,
    adapters: list[Path],
    prepared_dir: Path,
    *,
    mode: str = "simulation",
    superlink: str | None = None,
    out: Path,
    audit: Path | None = None,
    send_scaler: bool = True,
    min_contributing: int = 1,
    timeout: float = 600.0,
    dp: dict[str, Any] | None = None,
    keep_logs: bool = False,
) -> dict[str, Any]:
    """Federated statistics of the sites' prepared datasets: global count, mean and std per feature.

    Parameters
    ----------
    study:
        The study file; its hash is sent and every site checks its dataset was prepared for it.
    adapters:
        One adapter TOML per site (each site's name and ``min_cell_count`` come from it).
    prepared_dir:
        Folder holding ``<site>/`` datasets written by ``omopfl prepare``.
    mode:
        ``"simulation"`` (default), ``"deployment"`` or ``"inprocess"`` (see the module docstring).
    superlink:
        Deployment only: name of a SuperLink connection in the user's Flower configuration; None
        starts a loopback SuperLink and one SuperNode per adapter.
    out:
        Result JSON path.
    audit:
        If given, every reply of every site, as received, is written there.
    send_scaler:
        Send the global scaler back to every site (``query.scaler``).
    min_contributing:
        Fewest contributing sites for a global scaler.
    timeout:
        Seconds to wait for the replies of one query (and, times three, for the whole run).
    dp:
        ``{"epsilon": float, "delta": float, "bounds": {feature: [low, high]}}`` to ask every site for
        differentially private moments (public bounds for every feature).
    keep_logs:
        Keep the working folder (Flower logs, app, run config) of a deployment run.

    Returns
    -------
    dict
        The result written to ``out``.
    """
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}")
    started = time.perf_counter()
    spec = load_study(study)
    adapters = _site_adapters(adapters, "run_stats needs at least one site adapter", check_names=superlink is None)
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    run_config: dict[str, Any] = {
        **schema.STATS_CONFIG, "result-path": str(out), "audit-path": str(Path(audit).resolve()) if audit else "",
        "study-hash": spec.hash, "min-sites": len(adapters), "min-contributing": int(min_contributing),
        "timeout": float(timeout), "send-scaler": bool(send_scaler),
    }
    run_config.update(codec.study_dp_config(spec))  # the study's own DP (the sites check it)
    if dp is not None:
        run_config.update({"dp-epsilon": float(dp["epsilon"]), "dp-delta": float(dp["delta"]),
                           "dp-bounds": json.dumps({k: [float(v[0]), float(v[1])] for k, v in dp["bounds"].items()})})
    note = ""
    timings: dict[str, float] = {}
    engine_mode = mode
    if mode == "simulation":
        import importlib.util

        reason = ("ray is not installed (flwr[simulation])" if importlib.util.find_spec("ray") is None
                  else "its virtual SuperNodes get no node config (site adapter)")
        note = f"Flower's Simulation Engine was not used: {reason}; ran a loopback deployment instead"
        _log.warning(note)
        engine_mode = "deployment"
    if engine_mode == "inprocess":
        from omopfl.federation.coordinator import statistics as server_app

        run_inprocess(server_app.app, adapters, Path(prepared_dir).resolve(), run_config)
        engine = "inprocess (InProcessGrid)"
    else:
        engine = deploy_in_workdir("omopfl-stats-", keep_logs, adapters, Path(prepared_dir).resolve(), run_config,
                                    superlink, 3 * timeout + 120, timings)
    if not out.is_file():
        raise FederationError(f"the ServerApp wrote no result to {out}")
    result = json.loads(out.read_text())
    result["runner"] = {"mode": mode, "engine": engine, "note": note,
                        "seconds": round(time.perf_counter() - started, 3), "phases": timings}
    from omopfl.atomic import write_json

    write_json(out, result)
    return result


def quiet_flower_logs() -> None:
    """Flower's own INFO lines (sampling, aggregation counts) off, omopfl's progress lines and warnings on."""
    import logging

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.startswith("flwr.omopfl")

    for handler in logging.getLogger("flwr").handlers:
        if keep not in handler.filters:
            handler.addFilter(keep)


def _failure(run_dir: Path) -> str:
    """The message the ServerApp stopped with (``live.json`` phase ``failed``), or ``""``."""
    from omopfl.federation.coordinator.run_view import LIVE_FILE

    try:
        state = json.loads((run_dir / LIVE_FILE).read_text())
    except (OSError, ValueError):
        return ""
    return " ".join(str(state.get("message", "")).split()) if isinstance(state, dict) and \
        state.get("phase") == "failed" else ""


def train_inprocess(adapters: list[Path], prepared: Path, run_config: dict[str, Any], *,
                   grid_class: Any = None) -> None:
    """The training ServerApp in process (:func:`omopfl.federation.local.run_inprocess`); its own failures
    become one-line :class:`FederationError`, as a deployment's do (sites send fixed codes only)."""
    from omopfl.errors import OmopflError
    from omopfl.federation.coordinator.training import train_app

    try:
        run_inprocess(train_app, adapters, prepared, run_config, grid_class=grid_class)
    except (OmopflError, ValueError) as exc:  # RoundsFailed, the ServerApp's ConfigError/DataError, a CodecError
        raise FederationError(f"the run failed: {exc}") from None


def run_training(study: str | Path, adapters: Sequence[str | Path], prepared_dir: str | Path, *,
                 mode: str = "inprocess", out_dir: str | Path, rounds: int | None = None,
                 strategy: str | None = None, proximal_mu: float | None = None, audit: bool = False,
                 timeout: float = 900.0, keep_logs: bool = False, resume: bool = False,
                 min_sites: int | None = None, round_timeout: float = 600.0, evaluate_on_train: bool = True,
                 tuned: bool = True, extra_run_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Federated training of the study's model over the sites' prepared datasets.

    Parameters
    ----------
    study:
        The study file (model, training spec, cohorts; its hash is checked by every site).
    adapters:
        One adapter TOML per site.
    prepared_dir:
        Folder of the ``<site>/`` datasets written by ``omopfl prepare``.
    mode:
        ``"inprocess"`` or ``"deployment"`` (loopback SuperLink and ``omopfl train --site``
        SuperNodes), see the module docstring.
    out_dir:
        The run directory (module docstring).
    rounds, strategy, proximal_mu:
        Override the study's ``[training]`` values (the study file, and so its hash, stays the same).
    audit:
        Also write ``audit.json``: every site reply, as received.
    timeout:
        Deployment: seconds for the whole ``flwr run``.
    keep_logs:
        Deployment: keep the working folder (Flower logs, app, run config).
    resume:
        Continue from the run directory's checkpoint.
    min_sites:
        Fewest sites a round may go on with (default: every adapter).
    round_timeout:
        Seconds to wait for a round's replies before the missing sites are dropped.
    evaluate_on_train:
        Let each ``train`` message carry the evaluation of the previous global model (one exchange
        per round); False sends separate ``evaluate`` messages (Flower's default pattern).
    tuned:
        Deployment: start the SuperNodes with omopfl's shorter polling (False: Flower's stock).
    extra_run_config:
        Further run config values (e.g. ``poll-interval``).

    Returns
    -------
    dict
        The run's manifest (also ``out_dir/manifest.json``) plus ``runner`` (mode, seconds).
    """
    if mode not in TRAIN_MODES:
        raise ConfigError("run_training mode must be 'inprocess' or 'deployment'")
    started = time.perf_counter()
    spec = load_study(study)
    adapters = _site_adapters(adapters, "run_training needs at least one site adapter")
    run_dir = Path(out_dir).resolve()
    check_resume(run_dir, resume)
    run_config = schema.training_run_config(
        spec, run_dir, min_sites=min_sites or len(adapters), expected_sites=len(adapters), audit=audit,
        rounds=rounds, strategy=strategy, proximal_mu=proximal_mu, resume=resume, round_timeout=round_timeout,
        evaluate_on_train=evaluate_on_train)
    run_config.update(extra_run_config or {})
    prepared = Path(prepared_dir).resolve()
    (run_dir / "manifest.json").unlink(missing_ok=True)
    timings: dict[str, float] = {}
    if mode == "deployment":
        engine = deploy_in_workdir("omopfl-train-", keep_logs, adapters, prepared, run_config, None, timeout, timings,
                                    app_pyproject=schema.app_pyproject("train"), tuned=tuned)
    else:
        train_inprocess(adapters, prepared, run_config)
        engine = "inprocess (InProcessGrid)"
    if not (run_dir / "manifest.json").is_file():
        failed = _failure(run_dir)  # a deployment's ServerApp left its one-line cause in the live view
        if failed:
            raise FederationError(f"the run failed: {failed}")
        raise FederationError(f"the training ServerApp wrote no run directory at {run_dir}")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["runner"] = {"mode": mode, "engine": engine, "seconds": round(time.perf_counter() - started, 3),
                          "phases": timings}
    return manifest


def run_discovery(
    study: Path,
    adapters: list[Path],
    prepared_dir: Path,
    *,
    out: Path,
    result: Path | None = None,
    min_sites: int = 2,
    min_persons: int = 0,
    mode: str = "inprocess",
    timeout: float = 600.0,
) -> dict[str, Any]:
    """Run federated covariate discovery and write the covariate list ``out`` (CSV).

    Parameters
    ----------
    study:
        A study with ``[covariates]`` (analyses, windows) and no ``list`` yet, approved and prepared at
        every site.
    adapters:
        One adapter per site (in process and on a loopback deployment, each site's own adapter).
    prepared_dir:
        Folder of the sites' prepared datasets.
    out:
        The covariate list written (CSV, :data:`omopfl.covariate_sets.LIST_COLUMNS`).
    result:
        The discovery result JSON (default: ``out`` with ``.json``).
    min_sites:
        Keep a covariate released by at least this many sites.
    min_persons:
        Ask sites for covariates of at least this many persons; each site applies the larger of this and
        its own ``min_cell_count``.
    mode:
        ``"inprocess"`` (Flower's wire format, no network) or ``"deployment"`` (loopback SuperLink and
        SuperNodes, every process stopped by PID).

    Returns
    -------
    dict
        The result (also written to ``result``), with ``list`` naming the CSV.
    """
    from omopfl.atomic import write_json
    from omopfl.covariate_sets import describe_covariate, write_covariate_list
    from omopfl.federation.coordinator import discovery

    if mode not in TRAIN_MODES:
        raise ConfigError("--mode must be inprocess or deployment")
    if min_sites < 1:
        raise ConfigError("--min-sites must be at least 1")
    spec = load_study(study)
    if spec.covariates is None:
        raise ConfigError(f"{study}: [covariates] is missing; add [covariates] set = \"default\" to discover "
                          "covariates")
    if spec.covariates.covariate_ids is not None:
        raise ConfigError(f"{study}: [covariates] list is already set; discovery runs on the study without "
                          "a list")
    adapters = _site_adapters(adapters, "covariate discovery needs at least one site adapter (--site)")
    out = Path(out).resolve()
    result_path = Path(result).resolve() if result else out.with_suffix(".json")
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.unlink(missing_ok=True)
    run_config = {**schema.DISCOVERY_CONFIG, "result-path": str(result_path), "study-hash": spec.hash,
                  "min-persons": int(min_persons), "covariate-min-sites": int(min_sites),
                  "expected-sites": len(adapters), "timeout": float(timeout)}
    if mode == "inprocess":
        run_inprocess(discovery.app, adapters, Path(prepared_dir).resolve(), run_config)
    else:
        deploy_in_workdir("omopfl-covariates-", False, adapters, Path(prepared_dir).resolve(), run_config, None,
                          2 * timeout + 120, {}, app_pyproject=schema.app_pyproject("covariates"))
    if not result_path.is_file():
        raise FederationError(f"the discovery ServerApp wrote no result to {result_path}")
    found = json.loads(result_path.read_text())
    if not found["sites"]["answered"]:
        codes = ", ".join(f"{f['site'] or f['node']}: {f['code']}" for f in found["sites"]["failed"]) or "no reply"
        raise FederationError(f"no site answered the covariate discovery ({codes})")
    if not found["covariates"]:
        raise FederationError(f"no covariate is released by {min_sites} or more sites; lower --min-sites")
    per_site = found["sites_per_covariate"]
    write_covariate_list(out, [{"covariate_id": c, "covariate_name": describe_covariate(c), "sites": per_site[str(c)]}
                               for c in found["covariates"]])
    found["list"] = str(out)
    write_json(result_path, found)
    return found


def run_validation(run_dir: str | Path, adapters: list[Path], prepared_dir: str | Path, *, out: str | Path,
                   mode: str = "inprocess", superlink: str | None = None, rows: str = "all",
                   timeout: float = 600.0, keep_logs: bool = False) -> dict[str, Any]:
    """Federated external validation of the run in ``run_dir`` at the sites; the result written to ``out``.

    ``mode``: ``"inprocess"`` (the sites' ClientApps in this process, :class:`InProcessGrid`) or
    ``"deployment"`` (a loopback SuperLink with one SuperNode per adapter, or, with ``superlink``, an
    existing connection of the user's Flower configuration whose SuperNodes run at the sites).  The
    ServerApp is :data:`omopfl.federation.coordinator.validation.validate_app`.
    """
    from omopfl.external_validation import load_run
    from omopfl.federation.codec_validation import ROWS
    from omopfl.federation.coordinator import validation as fv

    if mode not in TRAIN_MODES:
        raise ConfigError("mode must be inprocess or deployment")
    if rows not in ROWS:
        raise ConfigError(f"--rows must be one of {', '.join(ROWS)}, not {rows!r}")
    run_dir = Path(run_dir).resolve()
    manifest = load_run(run_dir).manifest  # a DataError naming the file if the run is incomplete
    if not adapters and superlink is None:
        raise ConfigError("omopfl evaluate --federated --simulate needs --site ADAPTER (repeatable)")
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    run_config = {**schema.VALIDATE_CONFIG, "result-path": str(out), "run-dir": str(run_dir),
                  "study-hash": str(manifest.get("study_hash", "")), "rows": rows,
                  "min-sites": max(1, len(adapters)), "timeout": float(timeout)}
    prepared = Path(prepared_dir).resolve()
    if mode == "inprocess":
        run_inprocess(fv.validate_app, [Path(a).resolve() for a in adapters], prepared, run_config)
    else:
        deploy_in_workdir("omopfl-validate-", keep_logs, [Path(a).resolve() for a in adapters], prepared,
                          run_config, superlink, 2 * timeout + 120, {}, app_pyproject=schema.app_pyproject("validate"))
    if not out.is_file():
        raise FederationError(f"the validation ServerApp wrote no result to {out}")
    return json.loads(out.read_text())
