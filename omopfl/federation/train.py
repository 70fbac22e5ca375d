"""Federated training with Flower: ClientApp ``train``/``evaluate`` handlers and a training ServerApp.

The handlers are registered on the statistics ClientApp (:data:`omopfl.federation.client_app.app`),
so one SuperNode app answers ``query.stats``, ``query.scaler``, ``train`` and ``evaluate``; import
this module (or use the component ``omopfl.federation.train:client_app``) to have them.

Site side (``train`` / ``evaluate``)
    Loads the site's prepared dataset (node config ``site-config``, ``prepared-dir``) and the global
    scaler (kept by ``query.scaler`` in the context state, else ``<prepared-dir>/<site>/scaler.json``),
    builds :class:`omopfl.models.SiteTensors`, splits it deterministically
    (:func:`omopfl.models.split` with the study's ``test_fraction`` and ``seed``), and

    * ``train``: loads the received weights, trains ``local-epochs`` on the train rows (with the
      proximal term when the config holds ``proximal-mu`` > 0, FedProx) and replies
      ArrayRecord ``arrays`` (the model's state dict) + MetricRecord ``metrics``
      (``num-examples`` = train rows, ``loss``);
    * ``evaluate``: replies MetricRecord ``metrics`` with ``num-examples`` = test rows and the
      finite ones of ``loss``, ``auc``, ``accuracy``, ``f1``, ``kappa``.

    Nothing else leaves the site (:data:`TRAIN_REPLY_KEYS`, :data:`EVALUATE_REPLY_KEYS`).  A failure
    raises an exception whose text is a fixed code only (Flower turns it into an error reply).

Server side (:data:`train_app`)
    ``main``: the statistics phase and the global scaler
    (:func:`omopfl.federation.server_app.federated_statistics`), then ``rounds`` rounds of Flower's
    FedAvg / FedProx / FedAdam (``flwr.serverapp.strategy``) with federated evaluation after each
    round, then the run directory (:func:`write_run_dir`).

Run directory (``run-dir``)
    ``model.npz`` (state-dict name -> array), ``scaler.json``, ``features.json``, ``stats.json``,
    ``metrics.json`` / ``metrics.csv`` (per round: aggregated train loss, evaluate loss/auc/accuracy/f1/
    kappa, n), ``manifest.json`` (study name and hash, cohort definition hashes, model and training
    spec, sites, file sha256s, timings) and, when ``audit`` is on, ``audit.json`` (every site reply
    of the training phase as received: record names, keys, array shapes, metric values).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from omopfl.federation import codec
from omopfl.federation.client_app import SCALER_FILE, SiteFailure, load_site_dataset
from omopfl.federation.client_app import app as client_app
from omopfl.federation.server_app import Settings, federated_statistics, write_json

__all__ = ["client_app", "train_app", "run_training", "TRAIN_CONFIG", "TRAIN_REPLY_KEYS", "EVALUATE_REPLY_KEYS",
           "EVALUATE_METRICS", "site_train", "site_evaluate", "write_run_dir"]

_log = logging.getLogger("flwr.omopfl")

ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
WEIGHT_KEY = "num-examples"
EVALUATE_METRICS = ("loss", "auc", "accuracy", "f1", "kappa")
TRAIN_REPLY_KEYS: Mapping[str, frozenset[str]] = {METRICS: frozenset({WEIGHT_KEY, "loss"})}
"""Metric keys of a train reply (besides the ArrayRecord ``arrays`` of the model's state dict)."""
EVALUATE_REPLY_KEYS: Mapping[str, frozenset[str]] = {METRICS: frozenset({WEIGHT_KEY, *EVALUATE_METRICS})}
"""Metric keys of an evaluate reply (no arrays)."""

TRAIN_CONFIG: dict[str, Any] = {
    "run-dir": "",
    "audit": False,
    "study-name": "",
    "cohort-hashes": "{}",
    "model-kind": "logistic",
    "model-hidden": "[]",
    "model-dropout": "[0.0, 0.0]",
    "rounds": 5,
    "local-epochs": 1,
    "batch-size": 64,
    "learning-rate": 0.01,
    "strategy": "fedavg",
    "proximal-mu": 0.0,
    "test-fraction": 0.25,
    "seed": 0,
}
"""The training ServerApp's run config keys (besides :data:`omopfl.federation.runner.APP_CONFIG`)."""

train_app = ServerApp()


# --------------------------------------------------------------------------------------------
# site side
# --------------------------------------------------------------------------------------------


def _site_scaler(context: Context, prepared: Any, prepared_dir: Path) -> codec.GlobalScaler:
    try:
        scaler = codec.decode_scaler(context.state)
    except codec.CodecError:
        path = prepared_dir / prepared.site / SCALER_FILE
        if not path.is_file():
            raise SiteFailure("not_prepared") from None
        scaler = codec.GlobalScaler.from_dict(json.loads(path.read_text()))
    if list(scaler.feature_names) != list(prepared.feature_names):
        raise SiteFailure("feature_mismatch")
    study_hash = prepared.manifest.get("study_hash", "")
    if scaler.study_hash and study_hash and scaler.study_hash != study_hash:
        raise SiteFailure("study_mismatch")
    return scaler


def _cfg(config: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise codec.CodecError(f"config key {key!r} has the wrong type")
    return value


def _spec_from_config(config: Mapping[str, Any]) -> Any:
    from omopfl.study import ModelSpec

    hidden = json.loads(_cfg(config, "model-hidden", str, "[]"))
    dropout = json.loads(_cfg(config, "model-dropout", str, "[0.0, 0.0]"))
    kind = _cfg(config, "model-kind", str, "logistic")
    return ModelSpec(kind=kind, hidden=tuple(int(h) for h in hidden) or ModelSpec().hidden,
                     dropout=tuple(float(d) for d in dropout))


def _site_setup(content: RecordDict, context: Context) -> tuple[Any, Any, Any, np.ndarray, np.ndarray, dict]:
    """(model with the received weights or None, tensors, spec, train rows, test rows, config)."""
    from omopfl.models import SiteTensors, split

    if CONFIG not in content.config_records:
        raise codec.CodecError("config record missing")
    config = dict(content.config_records[CONFIG])
    _site, prepared = load_site_dataset(dict(context.node_config))
    scaler = _site_scaler(context, prepared, Path(str(context.node_config["prepared-dir"])))
    tensors = SiteTensors.from_prepared(prepared, scaler)
    test_fraction = float(_cfg(config, "test-fraction", (int, float), 0.25))
    seed = int(_cfg(config, "seed", int, 0))
    train_idx, test_idx = split(tensors.n, test_fraction, seed, prepared.y)
    return prepared, tensors, _spec_from_config(config), train_idx, test_idx, config


def _model(spec: Any, tensors: Any, content: RecordDict) -> Any:
    from omopfl.models import build_model

    if ARRAYS not in content.array_records:
        raise codec.CodecError("arrays record missing")
    model = build_model(spec, tensors.n_features, tensors.n_genes, tensors.image_size)
    model.load_state_dict(content.array_records[ARRAYS].to_torch_state_dict(), strict=True)
    return model


def site_train(content: RecordDict, context: Context) -> RecordDict:
    """A site's reply to ``train`` (see the module docstring)."""
    from omopfl.models import get_weights, train_local

    _prepared, tensors, spec, train_idx, _test_idx, config = _site_setup(content, context)
    model = _model(spec, tensors, content)
    mu = float(_cfg(config, "proximal-mu", (int, float), 0.0))
    server_round = int(_cfg(config, "server-round", int, 1))
    stats = train_local(model, tensors, train_idx, epochs=int(_cfg(config, "local-epochs", int, 1)),
                        batch_size=int(_cfg(config, "batch-size", int, 64)),
                        lr=float(_cfg(config, "learning-rate", (int, float), 0.01)), proximal_mu=mu,
                        global_params=get_weights(model) if mu > 0 else None,
                        seed=int(_cfg(config, "seed", int, 0)) * 1000 + server_round)
    metrics: dict[str, Any] = {WEIGHT_KEY: int(stats["n"])}
    if math.isfinite(float(stats["loss"])):
        metrics["loss"] = float(stats["loss"])
    return RecordDict({ARRAYS: ArrayRecord(model.state_dict()), METRICS: MetricRecord(metrics)})


def site_evaluate(content: RecordDict, context: Context) -> RecordDict:
    """A site's reply to ``evaluate``: finite test metrics and the test rows' count."""
    from omopfl.models import evaluate

    _prepared, tensors, spec, _train_idx, test_idx, _config = _site_setup(content, context)
    model = _model(spec, tensors, content)
    result = evaluate(model, tensors, test_idx)
    metrics: dict[str, Any] = {WEIGHT_KEY: int(test_idx.size)}
    for key in EVALUATE_METRICS:
        value = float(result.get(key, math.nan))
        if math.isfinite(value):
            metrics[key] = value
    return RecordDict({METRICS: MetricRecord(metrics)})


def _guarded(handler: Any, message: Message, context: Context) -> Message:
    try:
        content = handler(message.content, context)
    except Exception as exc:  # the text may echo data: only a fixed code leaves the site
        code = SiteFailure(exc.code).code if isinstance(exc, SiteFailure) else (
            "bad_request" if isinstance(exc, codec.CodecError) else "internal")
        _log.error("omopfl %s failed: %s (%s)", message.metadata.message_type, code, type(exc).__name__)
        raise RuntimeError(f"omopfl site error: {code}") from None
    return Message(content, reply_to=message)


@client_app.train()
def _train(message: Message, context: Context) -> Message:
    return _guarded(site_train, message, context)


@client_app.evaluate()
def _evaluate(message: Message, context: Context) -> Message:
    return _guarded(site_evaluate, message, context)


# --------------------------------------------------------------------------------------------
# server side
# --------------------------------------------------------------------------------------------


def _aggregate(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """n-weighted mean of every metric over the sites where it is present (NaN-free on the wire)."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    total = 0
    for record in records:
        metrics = next(iter(record.metric_records.values()))
        n = float(metrics[weighting_key])  # type: ignore[arg-type]
        total += int(n)
        for key, value in metrics.items():
            if key == weighting_key or not isinstance(value, int | float) or n <= 0:
                continue
            sums[key] = sums.get(key, 0.0) + n * float(value)
            weights[key] = weights.get(key, 0.0) + n
    out = MetricRecord({key: sums[key] / weights[key] for key in sums if weights[key] > 0})
    out["n"] = total
    return out


class _RoundGrid:
    """Delegates to a Grid; notes when each evaluate exchange ends (per-round timing) and, if given a
    list, records every reply's content as received (record names, keys, array shapes, metric values)."""

    def __init__(self, grid: Grid, log: list[dict[str, Any]] | None) -> None:
        self._grid = grid
        self._log = log
        self.evaluate_done: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        types = {m.metadata.message_type for m in messages}
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        if "evaluate" in types:
            self.evaluate_done.append(time.monotonic())
        for reply in replies if self._log is not None else ():
            entry: dict[str, Any] = {"node": reply.metadata.src_node_id,
                                     "message_type": reply.metadata.message_type or "/".join(sorted(types))}
            if reply.has_error():
                entry["flower_error_code"] = int(reply.error.code)
            else:
                entry["content"] = codec.to_plain(reply.content)
            self._log.append(entry)
        return replies


def _strategy(name: str, mu: float, min_nodes: int) -> Any:
    from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

    common = {"min_train_nodes": min_nodes, "min_evaluate_nodes": min_nodes, "min_available_nodes": min_nodes,
              "weighted_by_key": WEIGHT_KEY, "arrayrecord_key": ARRAYS, "configrecord_key": CONFIG,
              "train_metrics_aggr_fn": _aggregate, "evaluate_metrics_aggr_fn": _aggregate}
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(**common, proximal_mu=float(mu))
    if name == "fedadam":
        return FedAdam(**common)
    raise ValueError(f"unknown strategy {name!r}")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _finite(value: Any) -> Any:
    return float(value) if isinstance(value, int | float) and math.isfinite(float(value)) else None


def write_run_dir(run_dir: Path, *, state: Mapping[str, np.ndarray], scaler: Mapping[str, Any],
                  stats: Mapping[str, Any], rounds: Sequence[Mapping[str, Any]],
                  manifest: Mapping[str, Any], audit: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write the run directory (module docstring); returns the manifest written."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in state.items()})
    (run_dir / "model.npz").write_bytes(buffer.getvalue())
    write_json(run_dir / "scaler.json", dict(scaler))
    write_json(run_dir / "features.json", {"feature_names": list(scaler["feature_names"])})
    write_json(run_dir / "stats.json", dict(stats))
    write_json(run_dir / "metrics.json", {"rounds": list(rounds)})
    columns = ["round", "train_loss", "train_n", *(f"eval_{k}" for k in EVALUATE_METRICS), "eval_n", "seconds"]
    with (run_dir / "metrics.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rounds:
            writer.writerow({key: ("" if row.get(key) is None else row.get(key)) for key in columns})
    if audit is not None:
        write_json(run_dir / "audit.json", {"replies": audit})
    files = sorted(p.name for p in run_dir.iterdir() if p.is_file() and p.name != "manifest.json"
                   and not p.name.startswith("."))
    full = {**manifest, "files": {name: _sha256(run_dir / name) for name in files}}
    write_json(run_dir / "manifest.json", full)
    return full


def federated_training(grid: Grid, run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Stats -> scaler -> rounds of the strategy -> run directory; returns the manifest."""
    from omopfl.models import build_model
    from omopfl.study import TrainingSpec

    started = time.monotonic()
    config = {**TRAIN_CONFIG, **dict(run_config)}
    run_dir = Path(str(config["run-dir"]))
    if not str(config["run-dir"]):
        raise ValueError("run config run-dir is required")
    audit: list[dict[str, Any]] | None = [] if config["audit"] else None
    settings = Settings.from_run_config({**dict(run_config), "send-scaler": True})
    stats = federated_statistics(grid, settings)
    if stats["scaler"] is None:
        raise RuntimeError("no global scaler (too few sites contributed statistics): no training")
    stats_seconds = time.monotonic() - started
    scaler = codec.GlobalScaler.from_dict(stats["scaler"])
    spec = _spec_from_config(config)
    model = build_model(spec, len(scaler.feature_names), seed=int(config["seed"]))
    initial = ArrayRecord(model.state_dict())
    sites = stats["sites"]["scaler_acknowledged"]
    min_nodes = max(1, min(settings.min_sites, len(sites)))
    strategy = _strategy(str(config["strategy"]), float(config["proximal-mu"]), min_nodes)
    shared = {key: config[key] for key in ("model-kind", "model-hidden", "model-dropout", "test-fraction", "seed")}
    train_config = ConfigRecord({**shared, "local-epochs": int(config["local-epochs"]),
                                 "batch-size": int(config["batch-size"]),
                                 "learning-rate": float(config["learning-rate"])})
    t0 = time.monotonic()
    round_grid = _RoundGrid(grid, audit)
    result = strategy.start(grid=round_grid, initial_arrays=initial,
                            num_rounds=int(config["rounds"]), timeout=settings.timeout, train_config=train_config,
                            evaluate_config=ConfigRecord(shared))
    train_seconds = time.monotonic() - t0
    rounds = []
    marks = [t0, *round_grid.evaluate_done]
    for r in range(1, int(config["rounds"]) + 1):
        train = dict(result.train_metrics_clientapp.get(r, {}))
        evaluation = dict(result.evaluate_metrics_clientapp.get(r, {}))
        rounds.append({"round": r, "train_loss": _finite(train.get("loss")), "train_n": train.get("n"),
                       **{f"eval_{k}": _finite(evaluation.get(k)) for k in EVALUATE_METRICS},
                       "eval_n": evaluation.get("n"),
                       "seconds": round(marks[r] - marks[r - 1], 3) if r < len(marks) else None})
    training = {k: v for k, v in asdict(TrainingSpec()).items()}
    training.update(rounds=int(config["rounds"]), local_epochs=int(config["local-epochs"]),
                    batch_size=int(config["batch-size"]), learning_rate=float(config["learning-rate"]),
                    strategy=str(config["strategy"]), proximal_mu=float(config["proximal-mu"]),
                    test_fraction=float(config["test-fraction"]), seed=int(config["seed"]))
    manifest = {
        "version": 1, "study_name": str(config["study-name"]), "study_hash": settings.study_hash,
        "cohort_hashes": json.loads(str(config["cohort-hashes"])),
        "model": {"kind": spec.kind, "hidden": list(spec.hidden), "dropout": list(spec.dropout),
                  "n_features": len(scaler.feature_names)},
        "training": training, "sites": sites, "stats_sites": stats["sites"],
        "final": rounds[-1] if rounds else None,
        "seconds": {"stats": round(stats_seconds, 3), "training": round(train_seconds, 3),
                    "per_round": round(train_seconds / max(1, len(rounds)), 3),
                    "total": round(time.monotonic() - started, 3)},
    }
    state = {k: v.detach().cpu().numpy() for k, v in result.arrays.to_torch_state_dict().items()}
    return write_run_dir(run_dir, state=state, scaler=stats["scaler"], stats=stats, rounds=rounds,
                         manifest=manifest, audit=audit)


@train_app.main()
def _main(grid: Grid, context: Context) -> None:
    federated_training(grid, dict(context.run_config))


# --------------------------------------------------------------------------------------------
# runner
# --------------------------------------------------------------------------------------------


def _training_run_config(spec: Any, adapters: list[Path], run_dir: Path, *, audit: bool, rounds: int | None,
                         strategy: str | None, proximal_mu: float | None) -> dict[str, Any]:
    from omopfl.federation.runner import APP_CONFIG

    cohorts = {"target": _sha256(spec.target_cohort), "outcome": _sha256(spec.outcome_cohort)}
    t = spec.training
    return {
        **APP_CONFIG, "result-path": str(run_dir / "stats_result.json"), "study-hash": spec.hash,
        "min-sites": len(adapters), "min-contributing": 1, "send-scaler": True,
        "run-dir": str(run_dir), "audit": bool(audit), "study-name": spec.name, "cohort-hashes": json.dumps(cohorts),
        "model-kind": spec.model.kind, "model-hidden": json.dumps([int(h) for h in spec.model.hidden]),
        "model-dropout": json.dumps([float(d) for d in spec.model.dropout]),
        "rounds": int(rounds if rounds is not None else t.rounds), "local-epochs": int(t.local_epochs),
        "batch-size": int(t.batch_size), "learning-rate": float(t.learning_rate),
        "strategy": strategy if strategy is not None else t.strategy,
        "proximal-mu": float(proximal_mu if proximal_mu is not None else t.proximal_mu),
        "test-fraction": float(t.test_fraction), "seed": int(t.seed),
    }


def _app_pyproject() -> str:
    from omopfl.federation.runner import APP_CONFIG
    from omopfl.federation.runner import _app_pyproject as app_pyproject

    return app_pyproject(
        name="omopfl-train",
        description="omopfl federated training (stats, global scaler, FedAvg/FedProx/FedAdam)",
        serverapp="omopfl.federation.train:train_app",
        clientapp="omopfl.federation.train:client_app",
        config={**APP_CONFIG, **TRAIN_CONFIG},
    )


def run_training(study: str | Path, adapters: Sequence[str | Path], prepared_dir: str | Path, *,
                 mode: str = "inprocess", out_dir: str | Path, rounds: int | None = None,
                 strategy: str | None = None, proximal_mu: float | None = None,
                 audit: bool = False, timeout: float = 900.0, keep_logs: bool = False) -> dict[str, Any]:
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
        ``"inprocess"`` (:class:`omopfl.federation.runner.InProcessGrid`, no network) or
        ``"deployment"`` (a loopback SuperLink and one SuperNode per site, then ``flwr run`` of the
        components ``omopfl.federation.train:train_app`` / ``:client_app``).
    out_dir:
        The run directory (module docstring).
    rounds, strategy, proximal_mu:
        Override the study's ``[training]`` values (the study file, and so its hash, stays the same).
    audit:
        Also write ``audit.json``: every site reply of the training phase, as received.
    timeout:
        Deployment: seconds for the whole ``flwr run``.
    keep_logs:
        Deployment: keep the working folder (Flower logs, app, run config).

    Returns
    -------
    dict
        The run's manifest (also ``out_dir/manifest.json``) plus ``runner`` (mode, seconds).
    """
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from omopfl.config import load_site
    from omopfl.errors import ConfigError, FederationError
    from omopfl.federation.runner import InProcessGrid
    from omopfl.study import load_study

    if strategy is not None and strategy not in ("fedavg", "fedprox", "fedadam"):
        raise ConfigError("strategy must be one of fedavg, fedprox, fedadam")
    if mode not in ("inprocess", "deployment"):
        raise ConfigError("run_training mode must be 'inprocess' or 'deployment'")
    started = time.perf_counter()
    spec = load_study(study)
    adapters = [Path(a).resolve() for a in adapters]
    if not adapters:
        raise ConfigError("run_training needs at least one site adapter")
    names = [load_site(a).name for a in adapters]
    if len(set(names)) != len(names):
        raise ConfigError("two adapters name the same site")
    run_dir = Path(out_dir).resolve()
    run_config = _training_run_config(spec, adapters, run_dir, audit=audit, rounds=rounds,
                                      strategy=strategy, proximal_mu=proximal_mu)
    prepared = Path(prepared_dir).resolve()
    (run_dir / "manifest.json").unlink(missing_ok=True)
    timings: dict[str, float] = {}
    if mode == "deployment":
        import shutil
        import tempfile

        work = Path(tempfile.mkdtemp(prefix="omopfl-train-"))
        from omopfl.federation.runner import _run_deployment

        _run_deployment(adapters, prepared, run_config, None, work, timeout, timings, app_pyproject=_app_pyproject())
        if not keep_logs:
            shutil.rmtree(work, ignore_errors=True)
        engine = "deployment (loopback SuperLink + SuperNodes)"
    else:
        grid = InProcessGrid(client_app, [{"site-config": str(a), "prepared-dir": str(prepared)} for a in adapters],
                             run_config)
        context = Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(),
                          run_config=run_config)
        saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, grid.run.run_id, SUPERLINK_NODE_ID
        try:
            train_app(grid, context)
        finally:
            TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
        engine = "inprocess (InProcessGrid)"
    if not (run_dir / "manifest.json").is_file():
        raise FederationError(f"the training ServerApp wrote no run directory at {run_dir}")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["runner"] = {"mode": mode, "engine": engine, "seconds": round(time.perf_counter() - started, 3),
                          "phases": timings}
    return manifest
