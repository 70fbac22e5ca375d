"""The coordinator's training ServerApp: statistics, global scaler, rounds, checkpoints, run directory.

``main(grid, context)`` (component ``omopfl.federation.coordinator.training:train_app``):

1. the statistics phase (:func:`omopfl.federation.coordinator.statistics.federated_statistics`): global scaler,
   sent to every site; the sites that acknowledged it take part in training;
2. ``rounds`` rounds of Flower's FedAvg / FedProx / FedAdam (``flwr.serverapp.strategy``), driven
   by :func:`run_rounds` through the strategy's public ``configure_train`` / ``aggregate_train``
   (and ``configure_evaluate`` / ``aggregate_evaluate``), so that each round can be checkpointed and
   a dead site dropped;
3. a final federated evaluation and the run directory (:func:`write_run_dir`).

Faults
    Every wait is bounded: SuperNodes are awaited at most ``wait-seconds``, each statistics query at
    most ``timeout`` and each round at most ``round-timeout``.  A site whose reply does not come in
    time, or comes as an error, is dropped for the rest of the run and the log says so
    (``omopfl: site X dropped in round r: ...``); the run goes on while at least ``min-sites`` sites
    reply, and otherwise stops with an error, the last checkpoint kept.

Checkpoints and resume
    After every round ``checkpoint.npz`` (the global model and the strategy's server-side state,
    e.g. FedAdam's moments) and ``checkpoint.json`` (round, per-round metrics so far, sites,
    dropped sites, the scaler's and the training settings' digests) are replaced atomically in the
    run directory.  With ``resume`` the run starts after the checkpoint's round, once the new
    statistics phase gave the same scaler and the training settings are the same.

Round overhead
    :class:`FastGrid` collects replies with the Grid's public ``push_messages``/``pull_messages`` in a
    tight loop instead of ``send_and_receive``'s 3 s poll, and with ``evaluate-on-train`` each
    ``train`` message also asks the sites to evaluate the weights it carries (the previous round's
    global model), so a round is one exchange instead of two; a final ``evaluate`` exchange
    evaluates the last model.  Bytes sent and received per round are measured (Flower's protobuf
    serialisation of each message's content).

The server imports Flower, numpy and the pure codec/statistics; torch only to build the initial
model (:func:`omopfl.models.build_model`), never a module that reads patient data.
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from omopfl.atomic import write_bytes, write_json
from omopfl.errors import RoundsFailed
from omopfl.federation import codec
from omopfl.federation.codec import EVALUATE_METRICS, WEIGHT_KEY
from omopfl.federation.codec import TRAIN_ARRAYS as ARRAYS
from omopfl.federation.codec import TRAIN_CONFIG as CONFIG
from omopfl.federation.codec import TRAIN_EVALUATE as EVALUATE
from omopfl.federation.codec import TRAIN_METRICS as METRICS
from omopfl.federation.coordinator import run_view
from omopfl.federation.coordinator.statistics import Settings, federated_statistics
from omopfl.federation.flower_internals import content_bytes
from omopfl.federation.run_config import TRAIN_CONFIG

__all__ = ["train_app", "federated_training", "run_rounds", "FastGrid", "TRAIN_CONFIG", "write_run_dir",
           "CHECKPOINT_JSON", "CHECKPOINT_NPZ", "RoundsFailed", "site_epsilons", "privacy_summary"]

_log = logging.getLogger("flwr.omopfl")

CHECKPOINT_JSON = "checkpoint.json"
CHECKPOINT_NPZ = "checkpoint.npz"
_STRATEGY_STATE = ("m_t", "v_t", "c_global")  # FedOpt's moments, SCAFFOLD's control variate

train_app = ServerApp()


# --------------------------------------------------------------------------------------------
# grid
# --------------------------------------------------------------------------------------------


class FastGrid:
    """A Grid whose ``send_and_receive`` pulls replies in a tight loop (public push/pull calls).

    Flower's deployment grid sleeps 3 s between pulls; this one starts at ``poll`` seconds and backs
    off to at most ``max_poll``.  It also counts the bytes of every message sent and received and, if
    given a list, records every reply's content as received (:func:`codec.to_plain`: record names,
    keys, array shapes, metric values) for audit.  ``nodes`` restricts ``get_node_ids`` (the sites
    still taking part).
    """

    def __init__(self, grid: Grid, *, poll: float = 0.02, max_poll: float = 0.25,
                 audit: list[dict[str, Any]] | None = None) -> None:
        self._grid = grid
        self.poll = max(0.001, float(poll))
        self.max_poll = max(self.poll, float(max_poll))
        self.audit = audit
        self.nodes: list[int] | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.observer: Any = None  # the live run view (run_view.LiveState), told of nodes, sends and replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def get_node_ids(self) -> Iterable[int]:
        if self.nodes is not None:
            return list(self.nodes)
        nodes = list(self._grid.get_node_ids())
        if self.observer is not None:
            self.observer.nodes_seen(len(nodes))
        return nodes

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        if not messages:
            return []
        types = {m.metadata.message_type for m in messages}
        self.bytes_sent += sum(content_bytes(m) for m in messages)
        pending = {i for i in self._grid.push_messages(messages) if i}
        replies: list[Message] = []
        started = time.monotonic()
        deadline = None if timeout is None else started + float(timeout)
        wait = self.poll
        observer = self.observer
        if observer is not None:
            observer.exchange_started(types, [m.metadata.dst_node_id for m in messages], timeout)
        while pending:
            got = list(self._grid.pull_messages(list(pending)))
            replies.extend(got)
            pending -= {m.metadata.reply_to_message_id for m in got}
            if observer is not None:
                for reply in got:
                    observer.reply(reply, time.monotonic() - started)
                observer.waiting(time.monotonic() - started)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(wait if deadline is None else max(0.0, min(wait, deadline - time.monotonic())))
            wait = wait if got else min(self.max_poll, wait * 1.5)
        self.bytes_received += sum(content_bytes(m) for m in replies)
        if self.audit is not None:
            for reply in replies:
                self.audit.append(codec.audit_entry(reply, "/".join(sorted(types))))
        return replies


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# strategy, checkpoint
# --------------------------------------------------------------------------------------------


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
        raise ValueError(f"strategy {name!r} takes no {', '.join(sorted(set(options) - allowed))}")
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
    raise ValueError(f"unknown strategy {name!r}")


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


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
            raise ValueError(f"{run_dir / CHECKPOINT_NPZ} does not match {CHECKPOINT_JSON}")
        with np.load(io.BytesIO(payload)) as saved:
            arrays = {k: saved[f"model/{k}"] for k in meta["array_names"]}
            state = {name: {k: saved[f"{name}/{k}"] for k in keys} for name, keys in meta["strategy_state"].items()}
        return cls(round=int(meta["round"]), arrays=arrays, strategy_state=state, rows=list(meta["rows"]),
                   sites={str(k): int(v) for k, v in meta["sites"].items()}, dropped=list(meta["dropped"]),
                   identity=dict(meta["identity"]))


def _strategy_state(strategy: Any) -> dict[str, dict[str, np.ndarray]]:
    state = {}
    for name in _STRATEGY_STATE:
        value = getattr(strategy, name, None)
        if isinstance(value, dict) and value:
            state[name] = {k: np.asarray(v) for k, v in value.items()}
    return state


def _array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    from flwr.app import Array

    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in arrays.items()}


# --------------------------------------------------------------------------------------------
# rounds
# --------------------------------------------------------------------------------------------


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
        checkpoint = Checkpoint(round=server_round, arrays=_numpy(arrays), strategy_state=_strategy_state(strategy),
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
        checkpoint = Checkpoint(round=plan.num_rounds, arrays=_numpy(arrays), strategy_state=_strategy_state(strategy),
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


# --------------------------------------------------------------------------------------------
# run directory
# --------------------------------------------------------------------------------------------


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
        raise ValueError("run config run-dir is required")
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
            raise ValueError(f"resume: no {CHECKPOINT_JSON} in the run directory")
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
            raise ValueError(f"resume: the checkpoint's {' and '.join(which)} differ from this run's "
                             "(other study settings or other data): start a new run directory")
        if previous.round >= num_rounds:
            raise ValueError(f"resume: the checkpoint already has round {previous.round} of {num_rounds}: "
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
