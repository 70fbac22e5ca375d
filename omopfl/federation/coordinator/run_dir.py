"""The training run's directory: checkpoints after every round, and the files a finished run leaves.

``checkpoint.npz`` (the global model and the strategy's server-side state, e.g. FedAdam's moments) and
``checkpoint.json`` (round, per-round metrics so far, sites, dropped sites, the scaler's and the training
settings' digests) are replaced atomically after every round; ``--resume`` continues from them.  A finished
run writes ``model.npz``, ``scaler.json``, ``features.json``, ``stats.json``, ``metrics.json``/``.csv`` and
``manifest.json`` (with every file's sha256) through :mod:`omopfl.atomic`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from omopfl.atomic import write_bytes, write_json
from omopfl.errors import ConfigError, DataError
from omopfl.federation.codec import EVALUATE_METRICS
from omopfl.federation.coordinator import run_view

__all__ = ["CHECKPOINT_JSON", "CHECKPOINT_NPZ", "Checkpoint", "strategy_state", "CSV_COLUMNS", "write_run_dir",
           "check_resume"]


CHECKPOINT_JSON = "checkpoint.json"
CHECKPOINT_NPZ = "checkpoint.npz"
_STRATEGY_STATE = ("m_t", "v_t", "c_global")  # FedOpt's moments, SCAFFOLD's control variate


@dataclass
class Checkpoint:
    """The state after a completed round (see the module docstring)."""

    round: int
    arrays: dict[str, np.ndarray]
    strategy_state: dict[str, dict[str, np.ndarray]]
    rows: list[dict[str, Any]]
    sites: dict[str, int]
    dropped: list[dict[str, Any]]
    identity: dict[str, str]

    def save(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        flat = {f"model/{k}": v for k, v in self.arrays.items()}
        for name, state in self.strategy_state.items():
            flat.update({f"{name}/{k}": v for k, v in state.items()})
        buffer = io.BytesIO()
        np.savez(buffer, **flat)
        payload = buffer.getvalue()
        write_bytes(run_dir / CHECKPOINT_NPZ, payload)
        meta = {"version": 1, "round": self.round, "arrays_sha256": hashlib.sha256(payload).hexdigest(),
                "array_names": list(self.arrays),
                "strategy_state": {k: list(v) for k, v in self.strategy_state.items()},
                "rows": self.rows, "sites": self.sites, "dropped": self.dropped, "identity": self.identity}
        write_bytes(run_dir / CHECKPOINT_JSON, json.dumps(meta, indent=1).encode())

    @classmethod
    def load(cls, run_dir: Path) -> Checkpoint:
        meta = json.loads((run_dir / CHECKPOINT_JSON).read_text())
        payload = (run_dir / CHECKPOINT_NPZ).read_bytes()
        if hashlib.sha256(payload).hexdigest() != meta["arrays_sha256"]:
            raise DataError(f"{run_dir / CHECKPOINT_NPZ} does not match {CHECKPOINT_JSON}")
        with np.load(io.BytesIO(payload)) as saved:
            arrays = {k: saved[f"model/{k}"] for k in meta["array_names"]}
            state = {name: {k: saved[f"{name}/{k}"] for k in keys} for name, keys in meta["strategy_state"].items()}
        return cls(round=int(meta["round"]), arrays=arrays, strategy_state=state, rows=list(meta["rows"]),
                   sites={str(k): int(v) for k, v in meta["sites"].items()}, dropped=list(meta["dropped"]),
                   identity=dict(meta["identity"]))


def strategy_state(strategy: Any) -> dict[str, dict[str, np.ndarray]]:
    state = {}
    for name in _STRATEGY_STATE:
        value = getattr(strategy, name, None)
        if isinstance(value, dict) and value:
            state[name] = {k: np.asarray(v) for k, v in value.items()}
    return state


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


CSV_COLUMNS = ["round", "sites", "train_loss", "train_n", *(f"eval_{k}" for k in EVALUATE_METRICS), "eval_n",
               "seconds", "bytes_sent", "bytes_received"]


def write_run_dir(run_dir: Path, *, state: Mapping[str, np.ndarray], scaler: Mapping[str, Any],
                  stats: Mapping[str, Any], rounds: Sequence[Mapping[str, Any]],
                  manifest: Mapping[str, Any], audit: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write the run directory: model.npz, scaler/features/stats/metrics JSON, metrics.csv, manifest."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in state.items()})
    (run_dir / "model.npz").write_bytes(buffer.getvalue())
    write_json(run_dir / "scaler.json", dict(scaler))
    write_json(run_dir / "features.json", {"feature_names": list(scaler["feature_names"])})
    write_json(run_dir / "stats.json", dict(stats))
    write_json(run_dir / "metrics.json", {"rounds": list(rounds)})
    with (run_dir / "metrics.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rounds:
            writer.writerow({key: ("" if row.get(key) is None else row.get(key)) for key in CSV_COLUMNS})
    if audit is not None:
        write_json(run_dir / "audit.json", {"replies": audit})
    skip = {"manifest.json", CHECKPOINT_JSON, CHECKPOINT_NPZ, run_view.LIVE_FILE}
    files = sorted(p.name for p in run_dir.iterdir() if p.is_file() and p.name not in skip
                   and not p.name.startswith("."))
    full = {**manifest, "files": {name: _sha256(run_dir / name) for name in files}}
    write_json(run_dir / "manifest.json", full)
    return full


def check_resume(run_dir: Path, resume: bool) -> None:
    """``--resume`` needs the checkpoint of an interrupted run in ``run_dir``: a ConfigError naming it if not."""
    if resume and not (run_dir / CHECKPOINT_JSON).is_file():
        raise ConfigError(f"--resume: {run_dir / CHECKPOINT_JSON} not found: resume needs the run directory "
                          "of an interrupted run")
