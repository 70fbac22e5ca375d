"""Federated external validation driven by the coordinator (``omopfl evaluate --run RUN --federated``).

The coordinator sends a finished run's model (its state dict) and global scaler to every connected
site in one ``query.validate`` message; each site that approved the run's study applies it to its
own prepared dataset, at the site, and replies with the PLP-style measures of
:mod:`omopfl.external_validation` under its release rule (:mod:`omopfl.plp_metrics`), or with a
fixed code.  Sites that never trained take part like any other: what they need is the approval of
the study and its prepared dataset (the same dataset hash).

What a site checks (its trust boundary, :mod:`omopfl.federation.site.app`, then
:func:`omopfl.federation.site.validation.validate_reply`): the study hash is approved and the
prepared dataset is that study's; the model kind, layer widths and dropout are the approved
study's (``settings_mismatch``); the scaler is for the approved study and the site's features
(``study_mismatch``/``feature_mismatch``); every weight has the shape the approved model has and
is finite (``bad_request``); the site's policy releases metrics and allows the model kind, and
does not require DP (these measures carry no noise: ``policy``); one validation per run
(``round_limit``).  The reply goes into the site's audit log before it leaves.

This module is the coordinator's side (the wire format: :mod:`omopfl.federation.codec_validation`); it
reads no patient data.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from omopfl.federation import codec
from omopfl.federation.codec_validation import (
    VALIDATE_QUERY,
    decode_result,
    encode_request,
)
from omopfl.federation.run_config import VALIDATE_CONFIG

__all__ = ["validate_app", "federated_validation", "VALIDATE_CONFIG"]

_log = logging.getLogger("flwr.omopfl")

validate_app = ServerApp()


def _load_run(run_dir: Path) -> tuple[dict[str, Any], codec.GlobalScaler, dict[str, np.ndarray]]:
    from omopfl.external_validation import load_run

    run = load_run(run_dir)
    return run.manifest, run.scaler, run.state


def federated_validation(grid: Grid, run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Send the run's model to every connected site; collect their released results (written to
    ``result-path``)."""
    from omopfl.atomic import write_json

    config = {**VALIDATE_CONFIG, **dict(run_config)}
    run_dir = Path(str(config["run-dir"]))
    manifest, scaler, state = _load_run(run_dir)
    study_hash = str(config["study-hash"] or manifest.get("study_hash", ""))
    wanted = max(int(config["min-sites"]), int(config["expected-sites"]))
    deadline = time.monotonic() + float(config["wait-seconds"])
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    content = encode_request(study_hash, str(config["rows"]), manifest.get("model", {}), scaler, state)
    messages = [Message(content, dst_node_id=node, message_type=VALIDATE_QUERY, group_id=VALIDATE_QUERY)
                for node in nodes]
    replies = {r.metadata.src_node_id: r for r in grid.send_and_receive(messages, timeout=float(config["timeout"]))}
    sites: dict[str, Any] = {}
    refused: list[dict[str, Any]] = []
    for node in nodes:
        reply = replies.get(node)
        if reply is None:
            refused.append({"node": node, "code": "no_reply"})
            continue
        if reply.has_error():
            refused.append({"node": node, "code": f"flower_error_{int(reply.error.code)}"})
            continue
        refusal = codec.reply_refusal(reply.content)
        if refusal is not None:
            refused.append({"site": refusal[0], "node": node, "code": refusal[1]})
            continue
        try:
            name, result = decode_result(reply.content)
        except codec.CodecError:
            refused.append({"node": node, "code": "malformed"})
            continue
        sites[name] = result
    for entry in refused:
        _log.warning("omopfl validate: %s: %s", entry.get("site") or f"node {entry['node']}",
                     codec.ERROR_TEXT.get(entry["code"], entry["code"]))
    out = {"version": 1, "study_hash": study_hash, "run_dir": str(run_dir), "rows": str(config["rows"]),
           "model": manifest.get("model", {}).get("kind"), "connected": len(nodes), "sites": sites,
           "refused": refused}
    if str(config["result-path"]):
        write_json(Path(str(config["result-path"])), out)
    return out


@validate_app.main()
def _main(grid: Grid, context: Context) -> None:
    federated_validation(grid, dict(context.run_config))
