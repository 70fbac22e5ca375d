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

This module is the coordinator's side and the wire format: it reads no patient data.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from omopfl.federation import codec
from omopfl.federation.run_config import VALIDATE_CONFIG

__all__ = ["VALIDATE_QUERY", "ROWS", "encode_request", "decode_request", "encode_result", "decode_result",
           "ValidateRequest", "validate_app", "federated_validation", "VALIDATE_CONFIG", "MAX_RESULT_BYTES"]

_log = logging.getLogger("flwr.omopfl")

VALIDATE_QUERY = "query.validate"
ROWS = ("all", "test")
_REQUEST = "omopfl.validate"
_RESULT = "omopfl.validation"
_ARRAYS = "arrays"
MAX_RESULT_BYTES = 1 << 20
validate_app = ServerApp()


class ValidateRequest:
    """A decoded ``query.validate`` message."""

    def __init__(self, study_hash: str, rows: str, model: dict[str, str], scaler: codec.GlobalScaler,
                 state: dict[str, np.ndarray]) -> None:
        self.study_hash, self.rows, self.model, self.scaler, self.state = study_hash, rows, model, scaler, state


def encode_request(study_hash: str, rows: str, model: Mapping[str, Any], scaler: codec.GlobalScaler,
                   state: Mapping[str, np.ndarray]) -> RecordDict:
    """The message content: the study hash, rows, the model's description and weights, the global scaler."""
    if rows not in ROWS:
        raise codec.CodecError(f"rows must be one of {', '.join(ROWS)}")
    config = ConfigRecord({"protocol": codec.PROTOCOL, codec.STUDY_HASH_KEY: study_hash, "rows": rows,
                           "model-kind": str(model.get("kind", "logistic")),
                           "model-hidden": json.dumps([int(h) for h in model.get("hidden", [])]),
                           "model-dropout": json.dumps([float(d) for d in model.get("dropout", [])])})
    arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})
    return RecordDict({_REQUEST: config, _ARRAYS: arrays, **codec.scaler_record(scaler)})


def decode_request(content: RecordDict) -> ValidateRequest:
    """Read a ``query.validate`` message (:class:`codec.CodecError` if malformed)."""
    config = content.config_records.get(_REQUEST)
    if config is None:
        raise codec.CodecError("validate record missing")
    if config.get("protocol") != codec.PROTOCOL:
        raise codec.CodecError("another protocol version")
    values = {}
    for key in (codec.STUDY_HASH_KEY, "rows", "model-kind", "model-hidden", "model-dropout"):
        value = config.get(key)
        if not isinstance(value, str) or len(value) > 10_000:
            raise codec.CodecError(f"config key {key!r} is missing or has the wrong type")
        values[key] = value
    if values["rows"] not in ROWS:
        raise codec.CodecError("rows must be all or test")
    if _ARRAYS not in content.array_records:
        raise codec.CodecError("arrays record missing")
    state = {k: np.asarray(a.numpy()) for k, a in content.array_records[_ARRAYS].items()}
    model = {"kind": values["model-kind"], "hidden": values["model-hidden"], "dropout": values["model-dropout"]}
    return ValidateRequest(values[codec.STUDY_HASH_KEY], values["rows"], model, codec.decode_scaler(content), state)


def encode_result(site: str, result: Mapping[str, Any]) -> RecordDict:
    """A site's reply: its released validation result as JSON text."""
    text = json.dumps(_plain(result), sort_keys=True, allow_nan=False)
    return RecordDict({_RESULT: ConfigRecord({"protocol": codec.PROTOCOL, "site": site, "result": text})})


def _plain(value: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python numbers."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def decode_result(content: RecordDict) -> tuple[str, dict[str, Any]]:
    """``(site, result)`` of a site's ``query.validate`` reply (:class:`codec.CodecError` if malformed)."""
    record = content.config_records.get(_RESULT)
    if record is None or set(content.keys()) != {_RESULT}:
        raise codec.CodecError("not a validation reply")
    site, text = record.get("site"), record.get("result")
    if not isinstance(site, str) or not isinstance(text, str) or len(text) > MAX_RESULT_BYTES:
        raise codec.CodecError("malformed validation reply")
    try:
        result = json.loads(text)
    except ValueError:
        raise codec.CodecError("malformed validation reply") from None
    if not isinstance(result, dict):
        raise codec.CodecError("malformed validation reply")
    return site, result


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
