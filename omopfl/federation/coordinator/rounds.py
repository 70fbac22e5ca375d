"""The round loop of federated training over Flower's public strategy calls.

:func:`run_rounds` drives a ``flwr.serverapp.strategy`` strategy (FedAvg, FedProx, FedAdam, ...; omopfl's
FedNova and SCAFFOLD) through ``configure_train`` / ``aggregate_train`` (and ``configure_evaluate`` /
``aggregate_evaluate``), one round at a time, so each round is checkpointed (:mod:`run_dir`) and a dead
site dropped: every wait is bounded by ``round-timeout``; a site whose reply does not come in time, or comes
as an error, is dropped for the rest of the run and the log says so; the run goes on while at least
``min-sites`` sites reply.  With secure aggregation each round's updates are unmasked as a sum
(:mod:`omopfl.federation.coordinator.secure_rounds`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from omopfl.errors import ConfigError, RoundsFailed
from omopfl.federation import codec
from omopfl.federation.codec import EVALUATE_METRICS, WEIGHT_KEY
from omopfl.federation.codec import TRAIN_ARRAYS as ARRAYS
from omopfl.federation.codec import TRAIN_CONFIG as CONFIG
from omopfl.federation.codec import TRAIN_EVALUATE as EVALUATE
from omopfl.federation.codec import TRAIN_METRICS as METRICS
from omopfl.federation.coordinator.grid import FastGrid
from omopfl.federation.coordinator.run_dir import (
    Checkpoint,
    strategy_state,
)

__all__ = ["aggregate_metrics", "make_strategy", "RoundPlan", "site_epsilons", "privacy_summary", "run_rounds"]

_log = logging.getLogger("flwr.omopfl")


def aggregate_metrics(records: Sequence[RecordDict | MetricRecord], weighting_key: str = WEIGHT_KEY,
                      record: str | None = None) -> MetricRecord:
    """n-weighted mean of every metric over the replies where it is present; ``n`` = total weight."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    total = 0
    for item in records:
        if isinstance(item, MetricRecord):
            metrics = item
        elif record is not None:
            metrics = item.metric_records[record]
        else:
            metrics = next(iter(item.metric_records.values()))
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


def _finite(value: Any) -> Any:
    return float(value) if isinstance(value, int | float) and math.isfinite(float(value)) else None


def _eval_fields(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    metrics = dict(metrics or {})
    return {**{f"eval_{k}": _finite(metrics.get(k)) for k in EVALUATE_METRICS}, "eval_n": metrics.get("n")}


def make_strategy(name: str, mu: float, options: Mapping[str, float] | None = None) -> Any:
    """Flower's FedAvg / FedProx / FedAdam / FedYogi / FedAdagrad or omopfl's FedNova / SCAFFOLD
    (:mod:`omopfl.federation.coordinator.strategies`), weighting by ``num-examples``; sampling every site left.

    ``options``: the study's server optimizer settings (``eta``, ``eta_l``, ``beta_1``, ``beta_2``,
    ``tau``; :meth:`omopfl.study.TrainingSpec.server_options`); absent ones keep Flower's defaults.
    """
    from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedProx, FedYogi

    from omopfl.federation.coordinator.strategies import FedNova, Scaffold

    options = {k: float(v) for k, v in dict(options or {}).items()}
    common = {"min_train_nodes": 1, "min_evaluate_nodes": 1, "min_available_nodes": 1,
              "weighted_by_key": WEIGHT_KEY, "arrayrecord_key": ARRAYS, "configrecord_key": CONFIG,
              "train_metrics_aggr_fn": aggregate_metrics, "evaluate_metrics_aggr_fn": aggregate_metrics}
    allowed = {"fedadam": {"eta", "eta_l", "beta_1", "beta_2", "tau"}, "fedyogi": {"eta", "eta_l", "beta_1", "beta_2",
               "tau"}, "fedadagrad": {"eta", "eta_l", "tau"}, "scaffold": {"eta"}}.get(name, set())
    if set(options) - allowed:
        raise ConfigError(f"strategy {name!r} takes no {', '.join(sorted(set(options) - allowed))}")
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(**common, proximal_mu=float(mu))
    if name == "fedadam":
        return FedAdam(**common, **options)
    if name == "fedyogi":
        return FedYogi(**common, **options)
    if name == "fedadagrad":
        return FedAdagrad(**common, **options)
    if name == "fednova":
        return FedNova(**common)
    if name == "scaffold":
        return Scaffold(**common, **options)
    raise ConfigError(f"unknown strategy {name!r}")


def _array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    from flwr.app import Array

    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in arrays.items()}


@dataclass
class RoundPlan:
    """What :func:`run_rounds` needs besides the grid and the strategy."""

    num_rounds: int
    train_config: dict[str, Any]
    evaluate_config: dict[str, Any]
    round_timeout: float
    min_sites: int
    evaluate_on_train: bool
    run_dir: Path
    identity: dict[str, str]
    secure_aggregation: bool = False
    study_hash: str = ""
    participants: list[str] | None = None  # secure aggregation: the training's participants (set by run_rounds)


def _drop(sites: dict[str, int], dropped: list[dict[str, Any]], node: int, server_round: int, reason: str) -> None:
    name = next((s for s, n in sites.items() if n == node), f"node {node}")
    sites.pop(name, None)
    dropped.append({"site": name, "round": server_round, "reason": reason})
    _log.warning("omopfl: %s: %s; site %s dropped in round %d, going on with %d site(s)", name, reason, name,
                 server_round, len(sites))


def _exchange(grid: FastGrid, messages: list[Message], sites: dict[str, int], dropped: list[dict[str, Any]],
              server_round: int, timeout: float, min_sites: int, what: str) -> list[Message]:
    """Send, collect within ``timeout``, drop the sites that did not answer well; the good replies."""
    targets = {m.metadata.dst_node_id for m in messages}
    replies = grid.send_and_receive(messages, timeout=timeout)
    good = []
    answered = {r.metadata.src_node_id for r in replies}
    for reply in replies:
        if reply.has_error():
            _drop(sites, dropped, reply.metadata.src_node_id, server_round,
                  f"error reply (Flower error code {int(reply.error.code)})")
        elif (refusal := codec.reply_refusal(reply.content)) is not None:
            _drop(sites, dropped, reply.metadata.src_node_id, server_round,
                  f"{codec.ERROR_TEXT.get(refusal[1], refusal[1])} ({refusal[1]})")
        else:
            good.append(reply)
    for node in sorted(targets - answered):
        _drop(sites, dropped, node, server_round, f"no {what} reply within {timeout:.0f} s")
    grid.nodes = list(sites.values())
    if len(good) < min_sites:
        raise RoundsFailed(f"round {server_round}: {len(good)} site(s) replied, fewer than min-sites {min_sites}")
    return good


def _weight(reply: Message) -> int:
    """A reply's ``num-examples`` (0 when missing: a site below its min_cell_count sends 0)."""
    try:
        return int(reply.content.metric_records[METRICS][WEIGHT_KEY])  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError):
        return 0


def site_epsilons(replies: Sequence[Message], sites: Mapping[str, int]) -> dict[str, float]:
    """Each site's ``epsilon`` of its train reply (spent in all on the study at that site), by site name.

    Sites that train with DP-SGD report it (:func:`omopfl.federation.site.training._train_dp`); a site
    without DP reports none and is left out.
    """
    names = {node: name for name, node in sites.items()}
    out: dict[str, float] = {}
    for reply in replies:
        metrics = reply.content.metric_records.get(METRICS)
        value = None if metrics is None else metrics.get("epsilon")
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(float(value)):
            out[names.get(reply.metadata.src_node_id, f"node {reply.metadata.src_node_id}")] = float(value)
    return dict(sorted(out.items()))


def privacy_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The epsilon each site reported spending on the study, per round and after the last round it trained."""
    per_round = {int(r["round"]): dict(r["epsilon"]) for r in rows if r.get("epsilon")}
    if not per_round:
        return None
    final: dict[str, float] = {}
    for server_round in sorted(per_round):
        final.update(per_round[server_round])
    return {"epsilon_per_site": dict(sorted(final.items())),
            "epsilon_per_round": {str(k): v for k, v in sorted(per_round.items())}}


def run_rounds(grid: FastGrid, strategy: Any, plan: RoundPlan, start: Checkpoint) -> Checkpoint:
    """Rounds ``start.round + 1 .. plan.num_rounds`` and the final evaluation; checkpoint after each."""
    sites, dropped, rows = dict(start.sites), list(start.dropped), [dict(r) for r in start.rows]
    arrays = _array_record(start.arrays)
    for name, state in start.strategy_state.items():
        setattr(strategy, name, {k: np.array(v) for k, v in state.items()})
    grid.nodes = list(sites.values())
    checkpoint = start
    live = getattr(grid, "observer", None)
    participants = _train_keys(grid, plan, sites, dropped) if plan.secure_aggregation else None
    for server_round in range(start.round + 1, plan.num_rounds + 1):
        if live is not None:
            live.round_started(server_round)
        t0 = time.monotonic()
        sent0, received0 = grid.bytes_sent, grid.bytes_received
        evaluate_received = plan.evaluate_on_train and server_round > 1
        config = ConfigRecord({**plan.train_config, "evaluate-received": evaluate_received})
        messages = list(strategy.configure_train(server_round, arrays, config, grid))
        if participants is not None:
            from omopfl.federation.coordinator import secure_rounds as secure_train

            secure_train.attach(messages, participants)
        # with secure aggregation every participant must reply (secure_train.unmask_round names who did not)
        good = _exchange(grid, messages, sites, dropped, server_round, plan.round_timeout,
                         plan.min_sites if participants is None else 0, "train")
        evaluations = [r.content.metric_records[EVALUATE] for r in good if EVALUATE in r.content.metric_records]
        for reply in good:
            if EVALUATE in reply.content.metric_records:
                del reply.content[EVALUATE]
        if participants is not None:  # only the sum of the masked updates: secure_train.unmask_round
            aggregated, summed = secure_train.unmask_round(good, participants, server_round, arrays)
            trained = int(summed["trained"])
            train_metrics = MetricRecord({"n": int(summed["n"]), **({"loss": float(summed["loss"])}
                                                                    if summed["loss"] is not None else {})})
        else:
            weighted = [r for r in good if _weight(r) > 0]
            if not weighted:
                raise RoundsFailed(f"round {server_round}: no site had enough rows to train on (min_cell_count)")
            trained = len(weighted)
            aggregated, train_metrics = strategy.aggregate_train(server_round, weighted) if trained >= plan.min_sites \
                else (None, None)
        if trained < plan.min_sites:
            # a zero-weight reply (a site below its min_cell_count) answered but did not train
            raise RoundsFailed(f"round {server_round}: {trained} site(s) trained ({len(good)} replied; the "
                               f"others had too few rows for their min_cell_count), fewer than min-sites "
                               f"{plan.min_sites}")
        if aggregated is None:
            raise RoundsFailed(f"round {server_round}: the strategy could not aggregate the replies")
        if evaluate_received and rows and evaluations:
            rows[-1].update(_eval_fields(aggregate_metrics(evaluations)))
        arrays = aggregated
        row: dict[str, Any] = {"round": server_round, "sites": trained, "replied": len(good)}
        spent = site_epsilons(good, sites)
        if spent:
            row["epsilon"] = spent
        train = dict(train_metrics or {})
        row.update({"train_loss": _finite(train.get("loss")), "train_n": train.get("n")})
        if not plan.evaluate_on_train:
            row.update(_evaluate(grid, strategy, arrays, plan, sites, dropped, server_round))
        else:
            row.update(_eval_fields(None))
        row.update({"seconds": round(time.monotonic() - t0, 3), "bytes_sent": grid.bytes_sent - sent0,
                    "bytes_received": grid.bytes_received - received0})
        rows.append(row)
        checkpoint = Checkpoint(round=server_round, arrays=_numpy(arrays), strategy_state=strategy_state(strategy),
                                rows=rows, sites=dict(sites), dropped=list(dropped), identity=plan.identity)
        checkpoint.save(plan.run_dir)
        if live is not None:
            live.round_done(rows, dropped)
        _log.info("omopfl round %d/%d: %d site(s), train loss %s, %.2f s", server_round, plan.num_rounds, len(good),
                  "n/a" if row["train_loss"] is None else f"{row['train_loss']:.4f}", row["seconds"])
    if plan.evaluate_on_train and rows and rows[-1].get("eval_auc") is None and rows[-1].get("eval_n") is None:
        t0 = time.monotonic()
        sent0, received0 = grid.bytes_sent, grid.bytes_received
        if live is not None:
            live.evaluating()
        rows[-1].update(_evaluate(grid, strategy, arrays, plan, sites, dropped, plan.num_rounds))
        rows[-1]["final_evaluation_seconds"] = round(time.monotonic() - t0, 3)
        rows[-1]["bytes_sent"] = int(rows[-1].get("bytes_sent", 0)) + grid.bytes_sent - sent0
        rows[-1]["bytes_received"] = int(rows[-1].get("bytes_received", 0)) + grid.bytes_received - received0
        checkpoint = Checkpoint(round=plan.num_rounds, arrays=_numpy(arrays), strategy_state=strategy_state(strategy),
                                rows=rows, sites=dict(sites), dropped=list(dropped), identity=plan.identity)
        checkpoint.save(plan.run_dir)
    return checkpoint


def _train_keys(grid: FastGrid, plan: RoundPlan, sites: dict[str, int], dropped: list[dict[str, Any]]) -> Any:
    """Secure aggregation's key round at the start of training: the participants (the sites that published a
    key; the others are dropped before any update is masked)."""
    from omopfl.federation.coordinator import secure_rounds as secure_train
    from omopfl.secagg import MIN_SITES

    participants, failed = secure_train.collect_keys(grid, sites, plan.study_hash, plan.round_timeout)
    for name, reason in sorted(failed.items()):
        node = sites.get(name)
        if node is not None:
            _drop(sites, dropped, node, 0, f"no secure-aggregation key ({reason})")
    grid.nodes = list(sites.values())
    need = max(MIN_SITES, plan.min_sites)
    if len(participants.sites) < need:
        raise RoundsFailed(f"{len(participants.sites)} site(s) published a secure-aggregation "
                           f"key, fewer than the {need} secure aggregation needs: no training")
    plan.participants = list(participants.sites)
    _log.info("omopfl: secure aggregation of the training updates over %s", ", ".join(participants.sites))
    return participants


def _evaluate(grid: FastGrid, strategy: Any, arrays: ArrayRecord, plan: RoundPlan, sites: dict[str, int],
              dropped: list[dict[str, Any]], server_round: int) -> dict[str, Any]:
    messages = list(strategy.configure_evaluate(server_round, arrays, ConfigRecord(dict(plan.evaluate_config)), grid))
    good = _exchange(grid, messages, sites, dropped, server_round, plan.round_timeout, plan.min_sites, "evaluate")
    weighted = [r for r in good if _weight(r) > 0]
    metrics = strategy.aggregate_evaluate(server_round, weighted) if weighted else None
    return _eval_fields(metrics)
