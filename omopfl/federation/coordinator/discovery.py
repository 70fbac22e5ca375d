"""Federated covariate discovery (``omopfl covariates``): the coordinator's side (issue 13b).

Every site is sent ``query.covariates`` for a study it approved and prepared with a ``[covariates]``
set but no list yet.  Each site answers, through its trust boundary
(:func:`omopfl.federation.site.app.serve`), with the covariate ids held by at least its own
``min_cell_count`` persons (never counts).  The server keeps the ids released by at least
``min_sites`` sites and writes the covariate list (CSV: :data:`omopfl.covariate_sets.LIST_COLUMNS`),
which the study then names (``[covariates] list = "covariates.csv"``): the list becomes part of the
study hash, and the sites approve (and prepare) that final study.

On one machine :func:`omopfl.federation.local.run_discovery` runs it in process (Flower's wire format)
or on a loopback deployment (SuperLink + one SuperNode per site).
This module imports nothing that reads patient data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from omopfl.errors import ConfigError
from omopfl.federation import codec
from omopfl.federation.run_config import DISCOVERY_CONFIG

__all__ = ["app", "federated_discovery", "DiscoverySettings"]

app = ServerApp()


@dataclass(frozen=True)
class DiscoverySettings:
    """The discovery ServerApp's settings, read from the run config (:meth:`from_run_config`; the defaults
    are :data:`omopfl.federation.run_config.DISCOVERY_CONFIG`'s)."""

    result_path: str
    study_hash: str
    min_persons: int
    covariate_min_sites: int
    expected_sites: int
    wait_seconds: float
    timeout: float

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> DiscoverySettings:
        merged = {**DISCOVERY_CONFIG, **run_config}
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
        raise ConfigError("run config result-path is required")
    write_json(settings.result_path, federated_discovery(grid, settings))
