"""FedNova and SCAFFOLD as Flower strategies (subclasses of :class:`flwr.serverapp.strategy.FedAvg`).

Both use only Flower's public Message API (``configure_train`` / ``aggregate_train``) so that
:func:`omopfl.federation.coordinator.rounds.run_rounds` drives and checkpoints them like Flower's own
strategies.  The site's side is in :mod:`omopfl.federation.site.training` (``_train_fednova``,
``_train_scaffold``); what a site computes comes from the study it approved.

FedNova (Wang et al., 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous Federated
Optimization")
    Site ``i`` runs ``tau_i`` local SGD steps (momentum ``rho``) from the global model ``x`` to
    ``y_i`` and reports ``y_i`` with its normaliser ``a_i`` (metric ``fednova-a``):
    ``a_i = tau_i`` for plain SGD, ``a_i = [tau_i - rho (1 - rho^tau_i) / (1 - rho)] / (1 - rho)``
    with momentum.  The server forms the normalised updates ``d_i = (x - y_i) / a_i`` and applies
    ``x <- x - tau_eff * sum_i p_i d_i`` with ``p_i = n_i / sum n`` and ``tau_eff = sum_i p_i a_i``
    (the paper's choice, as in its reference code).  Sending ``y_i`` and ``a_i`` carries exactly
    what ``d_i`` does given ``x``, and keeps the reply a state dict as for every other strategy.

SCAFFOLD (Karimireddy et al., 2020, option II control variates)
    The server keeps ``x`` and the control variate ``c`` (checkpointed: ``c_global``) and sends both
    (``c`` under the keys ``scaffold-c/<parameter>`` of the message's ArrayRecord).  Site ``i``
    keeps its own ``c_i`` (zero at first) in its state folder for the run, takes ``K`` steps
    ``y <- y - eta_l (g_i(y) + c - c_i)``, sets ``c_i+ = c_i - c + (x - y) / (K eta_l)`` and replies
    ``y`` with ``dc_i = c_i+ - c_i`` (keys ``scaffold-dc/<parameter>``).  The server applies
    ``x <- x + eta_g * mean_i (y_i - x)`` and ``c <- c + (1 / N) * sum_i dc_i`` (= ``|S| / N`` times
    the mean), ``N`` the number of sites of the federation (the most nodes seen).  Means are
    unweighted, as in the paper.

Non-float arrays of a state dict (none in omopfl's models) are averaged as FedAvg does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from omopfl.federation.codec import FEDNOVA_A, SCAFFOLD_C_PREFIX, SCAFFOLD_DC_PREFIX, TRAIN_METRICS

__all__ = ["FedNova", "Scaffold"]


def _floating(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.floating)


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


class _Tracking(FedAvg):
    """FedAvg that remembers the global arrays it sent (as Flower's FedOpt does)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.current_arrays: dict[str, np.ndarray] | None = None

    def _remember(self, arrays: ArrayRecord) -> None:
        self.current_arrays = {k: np.array(v.numpy()) for k, v in arrays.items()}

    def _valid(self, replies: Iterable[Message]) -> list[Any]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        return [m.content for m in valid]

    def _metrics(self, contents: list[Any]) -> MetricRecord:
        return self.train_metrics_aggr_fn(contents, self.weighted_by_key)


class FedNova(_Tracking):
    """Normalized averaging (see the module docstring)."""

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._remember(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        contents = self._valid(replies)
        if not contents or self.current_arrays is None:
            return None, None
        x = self.current_arrays
        weights, normalisers, models = [], [], []
        for content in contents:
            metrics = content.metric_records[TRAIN_METRICS]
            a = float(metrics.get(FEDNOVA_A, 0.0))
            if not (np.isfinite(a) and a > 0):
                return None, None  # a reply without its normaliser cannot be aggregated
            weights.append(float(metrics[self.weighted_by_key]))
            normalisers.append(a)
            models.append({k: v.numpy() for k, v in content.array_records[self.arrayrecord_key].items()})
        p = np.asarray(weights) / float(sum(weights))
        tau_eff = float(np.dot(p, normalisers))
        new: dict[str, np.ndarray] = {}
        for key, current in x.items():
            if _floating(current):
                direction = sum(pi * (current - y[key]) / a for pi, a, y in zip(p, normalisers, models, strict=True))
                new[key] = (current - tau_eff * direction).astype(current.dtype)
            else:
                new[key] = sum(pi * y[key] for pi, y in zip(p, models, strict=True)).astype(current.dtype)
        return _record(new), self._metrics(contents)


class Scaffold(_Tracking):
    """SCAFFOLD with option II control variates (see the module docstring).

    Parameters
    ----------
    eta:
        The global step ``eta_g`` (1.0 in the paper's experiments).
    total_sites:
        ``N``; by default the most nodes the grid has shown.
    """

    def __init__(self, *, eta: float = 1.0, total_sites: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.eta = float(eta)
        self.total_sites = total_sites
        self.seen_sites = 0
        self.c_global: dict[str, np.ndarray] | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._remember(arrays)
        assert self.current_arrays is not None
        self.seen_sites = max(self.seen_sites, len(list(grid.get_node_ids())))
        if not self.c_global:
            self.c_global = {k: np.zeros_like(v) for k, v in self.current_arrays.items() if _floating(v)}
        both = {**self.current_arrays, **{SCAFFOLD_C_PREFIX + k: v for k, v in self.c_global.items()}}
        return super().configure_train(server_round, _record(both), config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        contents = self._valid(replies)
        if not contents or self.current_arrays is None or self.c_global is None:
            return None, None
        x, c = self.current_arrays, self.c_global
        models, changes = [], []
        for content in contents:
            record = content.array_records[self.arrayrecord_key]
            models.append({k: record[k].numpy() for k in x if k in record})
            changes.append({k: record[SCAFFOLD_DC_PREFIX + k].numpy() for k in c if SCAFFOLD_DC_PREFIX + k in record})
            if len(models[-1]) != len(x) or len(changes[-1]) != len(c):
                return None, None  # a reply without its weights or control variate change
        total = max(int(self.total_sites or 0), self.seen_sites, len(contents))
        new: dict[str, np.ndarray] = {}
        for key, current in x.items():
            mean = sum(y[key] for y in models) / len(models)
            new[key] = (current + self.eta * (mean - current)).astype(current.dtype) if _floating(current) \
                else np.asarray(mean).astype(current.dtype)
        self.c_global = {k: (v + sum(dc[k] for dc in changes) / total).astype(v.dtype) for k, v in c.items()}
        return _record(new), self._metrics(contents)
