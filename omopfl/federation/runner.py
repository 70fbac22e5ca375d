"""Run the federated statistics on one machine: every site's ClientApp and the ServerApp.

:func:`run_stats` has three modes:

``"deployment"``
    Flower's Deployment Engine on loopback: one ``flower-superlink --insecure`` and one
    ``flower-supernode --insecure`` per site (each with its own ``--port`` and
    ``--node-config "site-config='<adapter>' prepared-dir='<dir>'"``) as subprocesses on free
    localhost ports, then ``flwr run <app> omopfl --run-config <file> --stream``.  Every process
    is started in its own session and stopped by its PID (its process group) in a ``finally``.
    With ``superlink=<connection name>`` nothing is started: the run goes to that SuperLink
    connection of the user's Flower configuration, whose SuperNodes already run at the sites
    (``result-path`` then names a file on the SuperLink's machine).
``"simulation"``
    Flower's Simulation Engine (``flwr.simulation.run_simulation``) runs ClientApps only through
    its Ray backend (``RayBackend`` is the only backend in flwr 1.41; without ``ray`` it exits with
    ``SIMULATION_MISSING_EXTRA``), and its virtual nodes get no node config but ``partition-id``.
    So this mode runs the loopback deployment and says so in the result (``runner.note``).
``"inprocess"``
    No network and no subprocess: the same ``ServerApp`` and ``ClientApp`` objects, connected by
    :class:`InProcessGrid`, which passes every message through Flower's protobuf serialization
    (what would go on the wire) and calls the ClientApp as a SuperNode would.  Fast; for tests
    and development.

The result (also written to ``out``) is the ServerApp's (see
:func:`omopfl.federation.server_app.federated_statistics`) plus ``runner`` (mode, engine, seconds).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from uuid import uuid4

from flwr.serverapp import Grid

from omopfl.config import load_site
from omopfl.errors import ConfigError, FederationError
from omopfl.federation import codec, deploy
from omopfl.study import load_study

__all__ = ["run_stats", "run_validation", "run_inprocess", "run_deployment", "InProcessGrid", "FederationError",
           "MODES", "APP_CONFIG"]

MODES = ("simulation", "deployment", "inprocess")

_log = logging.getLogger("omopfl.federation")

APP_CONFIG: dict[str, Any] = {
    "result-path": "",
    "audit-path": "",
    "study-hash": "",
    "min-sites": 1,
    "expected-sites": 0,
    "min-contributing": 1,
    "wait-seconds": 120.0,
    "timeout": 600.0,
    "send-scaler": True,
    "dp-epsilon": 0.0,
    "secure-aggregation": False,
    "dp-delta": 1e-6,
    "dp-bounds": "",
}
"""The ServerApp's run config keys and defaults (``[tool.flwr.app.config]`` of the app)."""

FLOWER_ENV = deploy.FLOWER_ENV


# --------------------------------------------------------------------------------------------
# in-process grid
# --------------------------------------------------------------------------------------------


class InProcessGrid(Grid):
    """A Flower ``Grid`` whose nodes are ClientApps in this process (no network, no Ray).

    Each message and each reply goes through ``message_to_proto``/``message_from_proto``, so
    only what Flower can put on the wire reaches the other side; each node keeps its own
    ``Context`` (node config, state) across messages, as a SuperNode does.
    """

    def __init__(self, client_app: Any, node_configs: Iterable[dict[str, Any]], run_config: dict[str, Any],
                 run_id: int | None = None) -> None:
        from flwr.app import Context, RecordDict
        from flwr.supercore.run import Run

        self._run = Run.create_empty(run_id if run_id is not None else int(uuid4().int % (1 << 63)))
        self._app = client_app
        self._contexts = {}
        for i, node_config in enumerate(node_configs):
            node_id = 1000 + i
            self._contexts[node_id] = Context(run_id=self._run.run_id, node_id=node_id, node_config=dict(node_config),
                                              state=RecordDict(), run_config=dict(run_config))
        self._replies: dict[str, Any] = {}

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, content: Any, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Any:
        from flwr.app import Message

        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self._contexts)

    def context(self, node_id: int) -> Any:
        """The node's Context (its state holds what the ClientApp kept)."""
        return self._contexts[node_id]

    def push_messages(self, messages: Iterable[Any]) -> list[str]:
        from flwr.app import Error, Message
        from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
        from flwr.common.serde import message_from_proto, message_to_proto

        ids = []
        for message in messages:
            message.metadata.__dict__.update({"_message_id": uuid4().hex, "_run_id": self._run.run_id,
                                              "_src_node_id": SUPERLINK_NODE_ID})
            received = message_from_proto(message_to_proto(message))
            context = self._contexts.get(received.metadata.dst_node_id)
            if context is None:
                reply = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="node unavailable"), reply_to=received)
            else:
                try:
                    reply = self._app(received, context)
                except Exception:  # as a SuperNode does: an error reply (here without the text)
                    reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="ClientApp raised"),
                                    reply_to=received)
            reply.metadata.__dict__["_message_id"] = uuid4().hex
            self._replies[message.metadata.message_id] = message_from_proto(message_to_proto(reply))
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Any]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> list[Any]:
        return self.pull_messages(self.push_messages(messages))


# --------------------------------------------------------------------------------------------
# modes
# --------------------------------------------------------------------------------------------


def _app_pyproject() -> str:
    """The statistics app's ``pyproject.toml``."""
    return deploy.app_pyproject(
        name="omopfl-stats",
        description="omopfl federated statistics (global mean/std under minimum cell counts)",
        serverapp="omopfl.federation.server_app:app", clientapp="omopfl.federation.site_app:app",
        config=APP_CONFIG)


def run_inprocess(server_app: Any, adapters: list[Path], prepared_dir: Path, run_config: dict[str, Any], *,
                  grid_class: Any = None) -> None:
    """Run a ServerApp (statistics, training, discovery, validation) over the sites' ClientApps in this process.

    One :class:`InProcessGrid` (or ``grid_class``, same signature) node per adapter, each with the node
    config a SuperNode would have; the ServerApp gets a Context with ``run_config``.  The one in-process
    runner of every app (``omopfl stats``/``train``/``covariates``/``evaluate --federated`` on one machine).
    """
    from flwr.app import Context, RecordDict

    from omopfl.federation import site_app
    from omopfl.federation.flower_runtime import superlink_task_identity

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
        deploy.flwr_run(work, app_pyproject or _app_pyproject(), str(connection), run_config, env,
                        timeout=run_timeout)
        timings["flwr_run"] = round(time.perf_counter() - t0, 3)
    finally:
        t0 = time.perf_counter()
        procs.stop()
        timings["stop_processes"] = round(time.perf_counter() - t0, 3)
    return "deployment (loopback SuperLink + SuperNodes)" if superlink is None else f"deployment ({superlink})"


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
    adapters = [Path(a).resolve() for a in adapters]
    if not adapters:
        raise ConfigError("run_stats needs at least one site adapter")
    names = [load_site(a).name for a in adapters] if superlink is None else []
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"two adapters name the same site: {duplicates[0]}")
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    run_config: dict[str, Any] = {
        **APP_CONFIG, "result-path": str(out), "audit-path": str(Path(audit).resolve()) if audit else "",
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
        from omopfl.federation import server_app

        run_inprocess(server_app.app, adapters, Path(prepared_dir).resolve(), run_config)
        engine = "inprocess (InProcessGrid)"
    else:
        work = Path(tempfile.mkdtemp(prefix="omopfl-stats-"))
        ok = False
        try:
            engine = run_deployment(adapters, Path(prepared_dir).resolve(), run_config, superlink, work,
                                     run_timeout=3 * timeout + 120, timings=timings)
            ok = True
        finally:
            if ok and not keep_logs:
                shutil.rmtree(work, ignore_errors=True)
    if not out.is_file():
        raise FederationError(f"the ServerApp wrote no result to {out}")
    result = json.loads(out.read_text())
    result["runner"] = {"mode": mode, "engine": engine, "note": note,
                        "seconds": round(time.perf_counter() - started, 3), "phases": timings}
    from omopfl.atomic import write_json

    write_json(out, result)
    return result


def run_validation(run_dir: str | Path, adapters: list[Path], prepared_dir: str | Path, *, out: str | Path,
                   mode: str = "inprocess", superlink: str | None = None, rows: str = "all",
                   timeout: float = 600.0, keep_logs: bool = False) -> dict[str, Any]:
    """Federated external validation of the run in ``run_dir`` at the sites; the result written to ``out``.

    ``mode``: ``"inprocess"`` (the sites' ClientApps in this process, :class:`InProcessGrid`) or
    ``"deployment"`` (a loopback SuperLink with one SuperNode per adapter, or, with ``superlink``, an
    existing connection of the user's Flower configuration whose SuperNodes run at the sites).  The
    ServerApp is :data:`omopfl.federation.federated_validation.validate_app`.
    """
    from omopfl.external_validation import load_run
    from omopfl.federation import federated_validation as fv

    if mode not in ("inprocess", "deployment"):
        raise ConfigError("mode must be inprocess or deployment")
    if rows not in fv.ROWS:
        raise ConfigError(f"--rows must be one of {', '.join(fv.ROWS)}, not {rows!r}")
    run_dir = Path(run_dir).resolve()
    manifest = load_run(run_dir).manifest  # a DataError naming the file if the run is incomplete
    if not adapters and superlink is None:
        raise ConfigError("omopfl evaluate --federated --simulate needs --site ADAPTER (repeatable)")
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    run_config = {**fv.VALIDATE_CONFIG, "result-path": str(out), "run-dir": str(run_dir),
                  "study-hash": str(manifest.get("study_hash", "")), "rows": rows,
                  "min-sites": max(1, len(adapters)), "timeout": float(timeout)}
    prepared = Path(prepared_dir).resolve()
    if mode == "inprocess":
        run_inprocess(fv.validate_app, [Path(a).resolve() for a in adapters], prepared, run_config)
    else:
        work = Path(tempfile.mkdtemp(prefix="omopfl-validate-"))
        ok = False
        try:
            run_deployment([Path(a).resolve() for a in adapters], prepared, run_config, superlink, work,
                           run_timeout=2 * timeout + 120, timings={}, app_pyproject=fv.app_pyproject())
            ok = True
        finally:
            if ok and not keep_logs:
                shutil.rmtree(work, ignore_errors=True)
    if not out.is_file():
        raise FederationError(f"the validation ServerApp wrote no result to {out}")
    return json.loads(out.read_text())
