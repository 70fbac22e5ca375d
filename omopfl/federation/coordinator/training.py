"""The coordinator's training ServerApp: statistics, global scaler, rounds, checkpoints, run directory.

``main(grid, context)`` (component ``omopfl.federation.coordinator.training:train_app``):

1. the statistics phase (:func:`omopfl.federation.coordinator.statistics.federated_statistics`): global scaler,
   sent to every site; the sites that acknowledged it take part in training;
2. ``rounds`` rounds of Flower's FedAvg / FedProx / FedAdam (``flwr.serverapp.strategy``), driven by
   :func:`omopfl.federation.coordinator.rounds.run_rounds` through the strategy's public ``configure_train`` /
   ``aggregate_train`` (and ``configure_evaluate`` / ``aggregate_evaluate``), so that each round can be checkpointed and
   a dead site dropped;
3. a final federated evaluation and the run directory (:func:`omopfl.federation.coordinator.run_dir.write_run_dir`).

The round loop, its faults and its overhead: :mod:`omopfl.federation.coordinator.rounds` and
:mod:`omopfl.federation.coordinator.grid`; checkpoints, resume and the run directory:
:mod:`omopfl.federation.coordinator.run_dir`.  With ``resume`` the run starts after the checkpoint's round,
once the new statistics phase gave the same scaler and the training settings are the same.

The server imports Flower, numpy and the pure codec/statistics; torch only to build the initial
model (:func:`omopfl.models.build_model`), never a module that reads patient data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from omopfl.errors import ConfigError, RoundsFailed
from omopfl.federation import codec
from omopfl.federation.coordinator import run_view
from omopfl.federation.coordinator.grid import FastGrid
from omopfl.federation.coordinator.rounds import (
    RoundPlan,
    make_strategy,
    privacy_summary,
    run_rounds,
)
from omopfl.federation.coordinator.run_dir import (
    CHECKPOINT_JSON,
    CHECKPOINT_NPZ,
    Checkpoint,
    write_run_dir,
)
from omopfl.federation.coordinator.statistics import Settings, federated_statistics
from omopfl.federation.run_config import TRAIN_CONFIG

__all__ = ["train_app", "federated_training", "initial_model", "statistics_drops"]

_log = logging.getLogger("flwr.omopfl")


train_app = ServerApp()


# --------------------------------------------------------------------------------------------
# grid
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# strategy, checkpoint
# --------------------------------------------------------------------------------------------


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# rounds
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# run directory
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# the ServerApp
# --------------------------------------------------------------------------------------------


def _spec(config: Mapping[str, Any]) -> Any:
    from omopfl.study import ModelSpec

    return ModelSpec.from_settings(str(config["model-kind"]), str(config["model-hidden"]), str(config["model-dropout"]))


def initial_model(config: Mapping[str, Any], n_features: int) -> Any:
    """The round-0 model: the study's kind and widths, the image side and gene count its sites prepare."""
    from omopfl.models import build_model

    return build_model(_spec(config), n_features, int(config["model-genes"]), int(config["model-image-size"]),
                       seed=int(config["seed"]), n_covariates=int(config.get("model-covariates", 0)))


_IDENTITY_KEYS = ("study-hash", "model-kind", "model-hidden", "model-dropout", "local-epochs", "batch-size",
                  "learning-rate", "strategy", "proximal-mu", "test-fraction", "seed", "optimizer", "momentum",
                  "weight-decay", "local-steps", "strategy-options")


def statistics_drops(stats: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The sites lost in the statistics phase, as ``dropped`` entries of round 0.

    A site that failed, did not reply, or did not take the global scaler trains in no round; the
    manifest and the report list it with the phase and the reason (``phase: statistics``).
    """
    sites = stats.get("sites", {})
    drops = []
    for failure in sites.get("failed", []):
        code = str(failure.get("code", ""))
        drops.append({"site": failure.get("site") or f"node {failure.get('node')}", "round": 0,
                      "phase": "statistics", "reason": f"{codec.ERROR_TEXT.get(code, code)} ({code})"})
    for node in sites.get("no_reply", []):
        drops.append({"site": f"node {node}", "round": 0, "phase": "statistics",
                      "reason": "no statistics reply in time"})
    taken = set(sites.get("scaler_nodes", {}))
    for name in sites.get("contributing", []) + sites.get("withheld", []):
        if sites.get("scaler_nodes") is not None and stats.get("scaler") is not None and name not in taken:
            drops.append({"site": name, "round": 0, "phase": "statistics",
                          "reason": "did not take the global scaler"})
    return drops


def federated_training(grid: Grid, run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Stats -> scaler -> rounds (checkpointed) -> final evaluation -> run directory; returns the manifest."""
    from omopfl.study import TrainingSpec

    started = time.monotonic()
    config = {**TRAIN_CONFIG, **dict(run_config)}
    if not str(config["run-dir"]):
        raise ConfigError("run config run-dir is required")
    run_dir = Path(str(config["run-dir"]))
    audit: list[dict[str, Any]] | None = [] if config["audit"] else None
    fast = FastGrid(grid, poll=float(config["poll-interval"]), audit=audit)
    if bool(config["tune-pulls"]):
        from omopfl.federation.flower_internals import shorten_grid_pulls

        shorten_grid_pulls(grid)
    settings = Settings.from_run_config({**dict(run_config), "send-scaler": True})
    fast.observer = run_view.LiveState(run_dir, study=str(config["study-name"]), rounds=int(config["rounds"]),
                                       expected_sites=max(settings.expected_sites, settings.min_sites),
                                       min_sites=settings.min_sites)
    resume = bool(config["resume"])
    previous = None
    if resume:
        if not (run_dir / CHECKPOINT_JSON).is_file():
            raise ConfigError(f"resume: no {CHECKPOINT_JSON} in the run directory")
        previous = Checkpoint.load(run_dir)
    stats = federated_statistics(fast, settings)
    fast.observer.stats_done(stats)
    if int(stats["sites"]["connected"]) < settings.min_sites:
        raise RoundsFailed(f"{stats['sites']['connected']} site(s) connected within {settings.wait_seconds:.0f} s, "
                           f"fewer than min-sites {settings.min_sites}: no training")
    if stats["scaler"] is None:
        reasons = codec.refusal_summary(stats["sites"].get("failed", []))
        raise RoundsFailed("no global scaler, no training: too few sites contributed statistics"
                           + (f"; {reasons}" if reasons else ""))
    stats_seconds = time.monotonic() - started
    scaler = codec.GlobalScaler.from_dict(stats["scaler"])
    identity = {"settings": _digest({k: config[k] for k in _IDENTITY_KEYS}), "scaler": _digest(stats["scaler"])}
    sites = {str(k): int(v) for k, v in stats["sites"].get("scaler_nodes", {}).items()}
    if len(sites) < settings.min_sites:
        raise RoundsFailed(f"{len(sites)} site(s) took the global scaler, fewer than min-sites {settings.min_sites}")
    spec = _spec(config)
    num_rounds = int(config["rounds"])
    if previous is not None:
        if previous.identity != identity:
            which = [k for k in identity if previous.identity.get(k) != identity[k]]
            raise ConfigError(f"resume: the checkpoint's {' and '.join(which)} differ from this run's "
                             "(other study settings or other data): start a new run directory")
        if previous.round >= num_rounds:
            raise ConfigError(f"resume: the checkpoint already has round {previous.round} of {num_rounds}: "
                             "pass more rounds to continue")
        gone = sorted(set(previous.sites) - set(sites))
        if gone:
            _log.warning("omopfl: resuming without %s", ", ".join(gone))
        start = Checkpoint(round=previous.round, arrays=previous.arrays, strategy_state=previous.strategy_state,
                           rows=previous.rows, sites=sites, dropped=previous.dropped, identity=identity)
        _log.info("omopfl: resuming after round %d of %d", previous.round, num_rounds)
    else:
        model = initial_model(config, len(scaler.feature_names))
        initial = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        start = Checkpoint(round=0, arrays=initial, strategy_state={}, rows=[], sites=sites,
                           dropped=statistics_drops(stats), identity=identity)
        for name in (CHECKPOINT_JSON, CHECKPOINT_NPZ):
            (run_dir / name).unlink(missing_ok=True)
    shared = {key: config[key] for key in ("model-kind", "model-hidden", "model-dropout", "test-fraction", "seed")}
    shared[codec.STUDY_HASH_KEY] = settings.study_hash  # each site serves only the study it approved
    if int(config.get("model-covariates", 0)):  # a covariate study (issue 13b): its sites compare these too
        shared.update({"model-covariates": int(config["model-covariates"]), "model-l2": float(config["model-l2"])})
    plan = RoundPlan(
        num_rounds=num_rounds,
        train_config={**shared, "local-epochs": int(config["local-epochs"]), "batch-size": int(config["batch-size"]),
                      "learning-rate": float(config["learning-rate"]),
                      **codec.local_settings(str(config["strategy"]), str(config["optimizer"]),
                                             float(config["momentum"]), float(config["weight-decay"]),
                                             int(config["local-steps"]))},
        evaluate_config=shared, round_timeout=float(config["round-timeout"]), min_sites=settings.min_sites,
        evaluate_on_train=bool(config["evaluate-on-train"]), run_dir=run_dir, identity=identity,
        secure_aggregation=settings.secure_aggregation, study_hash=settings.study_hash)
    options = json.loads(str(config["strategy-options"]))
    strategy = make_strategy(str(config["strategy"]), float(config["proximal-mu"]), options)
    t0 = time.monotonic()
    final = run_rounds(fast, strategy, plan, start)
    train_seconds = time.monotonic() - t0
    rounds = final.rows
    training = asdict(TrainingSpec())
    training.update(rounds=num_rounds, local_epochs=int(config["local-epochs"]),
                    batch_size=int(config["batch-size"]), learning_rate=float(config["learning-rate"]),
                    strategy=str(config["strategy"]), proximal_mu=float(config["proximal-mu"]),
                    test_fraction=float(config["test-fraction"]), seed=int(config["seed"]),
                    min_sites=settings.min_sites, optimizer=str(config["optimizer"]),
                    momentum=float(config["momentum"]), weight_decay=float(config["weight-decay"]),
                    local_steps=int(config["local-steps"]))
    for key in ("eta", "eta_l", "beta_1", "beta_2", "tau"):  # the server optimizer settings the strategy used
        value = getattr(strategy, key, None)
        training[key] = float(value) if isinstance(value, int | float) else options.get(key)
    resumed_rounds = len(rounds) - (start.round if previous is not None else 0)
    manifest = {
        "version": 1, "study_name": str(config["study-name"]), "study_hash": settings.study_hash,
        "cohort_hashes": json.loads(str(config["cohort-hashes"])),
        "model": {"kind": spec.kind, "n_features": len(scaler.feature_names), "n_genes": int(config["model-genes"]),
                  "image_size": int(config["model-image-size"]),
                  **({"hidden": list(spec.hidden), "dropout": list(spec.dropout)}
                     if spec.kind in ("mlp", "fusion") else {})},
        "training": training, "sites": sorted(final.sites), "dropped": final.dropped,
        "resumed_from_round": previous.round if previous is not None else None,
        "stats_sites": stats["sites"], "final": rounds[-1] if rounds else None,
        "seconds": {"stats": round(stats_seconds, 3), "training": round(train_seconds, 3),
                    "per_round": round(train_seconds / max(1, resumed_rounds), 3),
                    "total": round(time.monotonic() - started, 3)},
        "bytes": {"sent": fast.bytes_sent, "received": fast.bytes_received,
                  "model": int(sum(v.nbytes for v in final.arrays.values()))},
    }
    if plan.participants is not None:  # the coordinator saw only sums of the updates (secure_train)
        manifest["secure_aggregation"] = {"statistics": True, "training": True, "participants": plan.participants}
    privacy = privacy_summary(rounds)
    if privacy is not None:  # DP-SGD: the epsilon each site reported spending on the study
        manifest["privacy"] = privacy
    if final.dropped:
        _log.warning("omopfl: the run finished without %s", ", ".join(d["site"] for d in final.dropped))
    written = write_run_dir(run_dir, state=final.arrays, scaler=stats["scaler"], stats=stats, rounds=rounds,
                            manifest=manifest, audit=audit)
    fast.observer.finished(rounds, final.dropped)
    return written


@train_app.main()
def _main(grid: Grid, context: Context) -> None:
    try:
        federated_training(grid, dict(context.run_config))
    except Exception as exc:
        run_view.mark_failed(Path(str(context.run_config.get("run-dir", ""))), str(exc))
        raise
