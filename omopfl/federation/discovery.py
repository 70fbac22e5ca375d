"""Federated covariate discovery (``omopfl covariates``): the coordinator's side (issue 13b).

Every site is sent ``query.covariates`` for a study it approved and prepared with a ``[covariates]``
set but no list yet.  Each site answers, through its trust boundary
(:func:`omopfl.federation.site_app.serve`), with the covariate ids held by at least its own
``min_cell_count`` persons (never counts).  The server keeps the ids released by at least
``min_sites`` sites and writes the covariate list (CSV: :data:`omopfl.covariate_sets.LIST_COLUMNS`),
which the study then names (``[covariates] list = "covariates.csv"``): the list becomes part of the
study hash, and the sites approve (and prepare) that final study.

Like :func:`omopfl.federation.runner.run_stats`, it runs in process (:class:`runner.InProcessGrid`,
Flower's wire format) or on a loopback deployment (SuperLink + one SuperNode per site).
This module imports nothing that reads patient data.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from omopfl.covariate_sets import describe_covariate, write_covariate_list
from omopfl.errors import ConfigError, FederationError
from omopfl.federation import codec, deploy

__all__ = ["app", "federated_discovery", "run_discovery", "DiscoverySettings", "APP_CONFIG"]

APP_CONFIG: dict[str, Any] = {
    "result-path": "",
    "study-hash": "",
    "min-persons": 0,
    "covariate-min-sites": 1,
    "expected-sites": 0,
    "wait-seconds": 120.0,
    "timeout": 600.0,
}
"""The discovery ServerApp's run config keys and defaults."""

app = ServerApp()


@dataclass(frozen=True)
class DiscoverySettings:
    result_path: str
    study_hash: str
    min_persons: int = 0
    covariate_min_sites: int = 1
    expected_sites: int = 0
    wait_seconds: float = 120.0
    timeout: float = 600.0

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> DiscoverySettings:
        merged = {**APP_CONFIG, **run_config}
        return cls(str(merged["result-path"]), str(merged["study-hash"]), int(merged["min-persons"]),
                   int(merged["covariate-min-sites"]), int(merged["expected-sites"]),
                   float(merged["wait-seconds"]), float(merged["timeout"]))


def _nodes(grid: Grid, settings: DiscoverySettings) -> list[int]:
    deadline = time.monotonic() + settings.wait_seconds
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= max(settings.expected_sites, 1) or time.monotonic() >= deadline:
            return nodes
        time.sleep(0.2)


def federated_discovery(grid: Grid, settings: DiscoverySettings) -> dict[str, Any]:
    """Ask every node for its released covariate ids; keep those of at least ``covariate_min_sites`` sites.

    Returns
    -------
    dict
        ``covariates`` (kept ids, sorted), ``sites_per_covariate`` (id -> sites releasing it, for every id
        released anywhere), ``sites`` (``answered``: site -> number of ids released; ``failed``:
        ``{"node", "site", "code"}``; ``no_reply``: node ids), ``min_sites``, ``min_persons_requested``.
    """
    started = time.perf_counter()
    nodes = _nodes(grid, settings)
    messages = [Message(codec.encode_covariates_request(settings.study_hash, settings.min_persons), dst_node_id=node,
                        message_type=codec.COVARIATES_QUERY, group_id=codec.COVARIATES_QUERY) for node in nodes]
    replies = {r.metadata.src_node_id: r for r in grid.send_and_receive(messages, timeout=settings.timeout)}
    answered: dict[str, int] = {}
    failed: list[dict[str, Any]] = []
    counts: dict[int, int] = {}
    for node in nodes:
        reply = replies.get(node)
        if reply is None:
            continue
        if reply.has_error():
            failed.append({"node": node, "site": "", "code": "client_error"})
            continue
        try:
            site, ids = codec.decode_covariates_reply(reply.content)
        except codec.CodecError:
            try:
                decoded = codec.decode_site_reply(reply.content)
                failed.append({"node": node, "site": decoded.site, "code": decoded.code or decoded.status})
            except codec.CodecError:
                failed.append({"node": node, "site": "", "code": "bad_reply"})
            continue
        answered[site] = len(ids)
        for c in ids:
            counts[c] = counts.get(c, 0) + 1
    least = max(int(settings.covariate_min_sites), 1)
    kept = sorted(c for c, n in counts.items() if n >= least)
    return {"covariates": kept, "sites_per_covariate": {str(c): n for c, n in sorted(counts.items())},
            "sites": {"answered": answered, "failed": failed, "no_reply": [n for n in nodes if n not in replies]},
            "min_sites": least, "min_persons_requested": settings.min_persons,
            "seconds": round(time.perf_counter() - started, 3)}


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point: settings from the run config, result JSON to ``result-path``."""
    from omopfl.atomic import write_json

    settings = DiscoverySettings.from_run_config(dict(context.run_config))
    if not settings.result_path:
        raise ValueError("run config result-path is required")
    write_json(settings.result_path, federated_discovery(grid, settings))


def _app_pyproject() -> str:
    return deploy.app_pyproject(
        name="omopfl-covariates", description="omopfl federated covariate discovery (ids held by >= k persons)",
        serverapp="omopfl.federation.discovery:app", clientapp="omopfl.federation.site_app:app", config=APP_CONFIG)


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
    from omopfl.config import load_site
    from omopfl.federation.runner import run_deployment, run_inprocess
    from omopfl.study import load_study

    if mode not in ("inprocess", "deployment"):
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
    adapters = [Path(a).resolve() for a in adapters]
    if not adapters:
        raise ConfigError("covariate discovery needs at least one site adapter (--site)")
    names = [load_site(a).name for a in adapters]
    if len(set(names)) != len(names):
        raise ConfigError("two adapters name the same site")
    out = Path(out).resolve()
    result_path = Path(result).resolve() if result else out.with_suffix(".json")
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.unlink(missing_ok=True)
    run_config = {**APP_CONFIG, "result-path": str(result_path), "study-hash": spec.hash,
                  "min-persons": int(min_persons), "covariate-min-sites": int(min_sites),
                  "expected-sites": len(adapters), "timeout": float(timeout)}
    if mode == "inprocess":
        run_inprocess(app, adapters, Path(prepared_dir).resolve(), run_config)
    else:
        work = Path(tempfile.mkdtemp(prefix="omopfl-covariates-"))
        try:
            run_deployment(adapters, Path(prepared_dir).resolve(), run_config, None, work,
                            run_timeout=2 * timeout + 120, timings={}, app_pyproject=_app_pyproject())
        finally:
            shutil.rmtree(work, ignore_errors=True)
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
