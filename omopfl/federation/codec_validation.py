"""Federated external validation on the wire: ``query.validate`` and a site's reply.

The request carries a finished run's study hash, the rows to score (``all`` or the fixed ``test`` set), the
model's description and weights, and the global scaler; the reply carries the site's released result as JSON
text (at most :data:`MAX_RESULT_BYTES`).  The flow and what a site checks:
:mod:`omopfl.federation.coordinator.validation`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from omopfl.federation import codec

__all__ = ["VALIDATE_QUERY", "ROWS", "MAX_RESULT_BYTES", "ValidateRequest", "encode_request", "decode_request",
           "encode_result", "decode_result"]


VALIDATE_QUERY = "query.validate"
ROWS = ("all", "test")
_REQUEST = "omopfl.validate"
_RESULT = "omopfl.validation"
_ARRAYS = "arrays"
MAX_RESULT_BYTES = 1 << 20


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
