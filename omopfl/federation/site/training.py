"""The site's Flower ClientApp handlers for training: ``train`` and ``evaluate``.

They run behind the site's trust boundary (:mod:`omopfl.federation.site.app`, the app's component
``omopfl.federation.site.app:app``), which has checked the study and the message and replaced the
message's config with the approved study's settings before they are called, and which audits and
sends the reply.

What a site does
    Loads its prepared dataset (node config ``site-config``, ``prepared-dir``) and the global scaler
    (kept by ``query.scaler`` in the context state, else ``<prepared-dir>/<site>/scaler.json``),
    builds :class:`omopfl.models.SiteTensors`, splits it deterministically
    (:func:`omopfl.models.split` with the study's ``test-fraction`` and ``seed``, or, when the study
    fixes its test set with ``[split]`` (``split-method`` hash or cohort), the prepared
    ``test_mask.npy``, :mod:`omopfl.splits`), and

    * ``train``: when the config says ``evaluate-received`` (every round after the first), first
      evaluates the weights it received, which are the global model of the previous round, on its
      test rows and adds them as the MetricRecord ``evaluate``; then loads them, trains
      ``local-epochs`` on its train rows (with the proximal term when ``proximal-mu`` > 0, FedProx)
      and replies ArrayRecord ``arrays`` (the state dict) + MetricRecord ``metrics``
      (``num-examples`` = train rows, ``loss``).  Evaluating on the training message halves the
      messages per round; it is sound because the weights and the test rows are exactly those a
      separate ``evaluate`` message would have carried.
    * ``evaluate``: replies MetricRecord ``metrics`` with ``num-examples`` = test rows and the
      finite ones of ``loss``, ``auc``, ``accuracy``, ``f1``, ``kappa``.

    Nothing else leaves the site (:data:`TRAIN_REPLY_KEYS`, :data:`EVALUATE_REPLY_KEYS`), and nothing
    computed over fewer persons than the site's ``min_cell_count``: with fewer train rows the site sends
    the weights back as received with ``num-examples`` 0 (the server leaves it out of the average), with
    fewer test rows its evaluation is ``num-examples`` 0 alone.  A failure
    raises an exception whose text is a fixed code only (Flower turns it into an error reply).

Long-lived worker
    Flower (1.41, 1.42) starts a new ``flwr-clientapp`` process for every message, which would import torch
    and load the dataset every time.  When the node config names a ``worker-socket`` (``omopfl
    train --site`` starts one, :mod:`omopfl.federation.site.worker`), the handler forwards the message
    content and the context state to that long-lived process, which runs the same functions
    with torch imported and the dataset cached; without it (or if it is gone) the work is done here.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Context, MetricRecord, RecordDict

from omopfl.errors import SiteFailure
from omopfl.federation import codec
from omopfl.federation.codec import EVALUATE_METRICS, WEIGHT_KEY
from omopfl.federation.codec import TRAIN_ARRAYS as ARRAYS
from omopfl.federation.codec import TRAIN_CONFIG as CONFIG
from omopfl.federation.codec import TRAIN_EVALUATE as EVALUATE
from omopfl.federation.codec import TRAIN_METRICS as METRICS
from omopfl.federation.site.statistics import SCALER_FILE, check_scaler, load_site_dataset

__all__ = ["site_train", "site_evaluate", "HANDLERS", "TRAIN_REPLY_KEYS", "EVALUATE_REPLY_KEYS", "EVALUATE_METRICS",
           "ARRAYS", "METRICS", "CONFIG", "EVALUATE", "WEIGHT_KEY", "fednova_normaliser"]

_log = logging.getLogger("flwr.omopfl")

TRAIN_REPLY_KEYS: Mapping[str, frozenset[str]] = {
    METRICS: frozenset({WEIGHT_KEY, "loss", "epsilon", codec.FEDNOVA_A}),
    EVALUATE: frozenset({WEIGHT_KEY, *EVALUATE_METRICS}),
}
"""Metric records and keys of a train reply (besides the ArrayRecord ``arrays`` of the state dict);
``evaluate`` is present only when the config asked for ``evaluate-received``."""
EVALUATE_REPLY_KEYS: Mapping[str, frozenset[str]] = {METRICS: frozenset({WEIGHT_KEY, *EVALUATE_METRICS})}
"""Metric keys of an evaluate reply (no arrays)."""

_CACHE: dict[tuple, tuple[Any, Any, Any]] = {}
_CACHE_SIZE = 4


def _site_scaler(context: Context, prepared: Any, prepared_dir: Path, study_hash: str | None) -> codec.GlobalScaler:
    try:
        scaler = codec.decode_scaler(context.state)
    except codec.CodecError:
        path = prepared_dir / prepared.site / SCALER_FILE
        if not path.is_file():
            raise SiteFailure("not_prepared") from None
        scaler = codec.GlobalScaler.from_dict(json.loads(path.read_text()))
    return check_scaler(prepared, scaler, study_hash)  # built for the message's (approved) study


def _cfg(config: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = config.get(key, default)
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise codec.CodecError(f"config key {key!r} has the wrong type")
    if not isinstance(value, kind):
        raise codec.CodecError(f"config key {key!r} has the wrong type")
    return value


def spec_from_config(config: Mapping[str, Any]) -> Any:
    """The :class:`omopfl.study.ModelSpec` a training/evaluate config describes."""
    from omopfl.study import ModelSpec

    return ModelSpec.from_settings(_cfg(config, "model-kind", str, "logistic"), _cfg(config, "model-hidden", str, "[]"),
                                   _cfg(config, "model-dropout", str, "[0.0, 0.0]"))


def _tensors_and_split(context: Context, config: Mapping[str, Any]) -> tuple[Any, Any, Any, int]:
    """(tensors, train rows, test rows, the site's min_cell_count); tensors and split cached per dataset
    version, scaler and split settings in this process."""
    from omopfl.models import SiteTensors, split

    site, prepared = load_site_dataset(dict(context.node_config))
    prepared_dir = Path(str(context.node_config["prepared-dir"]))
    study_hash = config.get(codec.STUDY_HASH_KEY)
    scaler = _site_scaler(context, prepared, prepared_dir, study_hash if isinstance(study_hash, str) else None)
    test_fraction = float(_cfg(config, "test-fraction", (int, float), 0.25))
    seed = int(_cfg(config, "seed", int, 0))
    method = str(_cfg(config, "split-method", str, "random"))
    manifest = prepared_dir / prepared.site / "manifest.json"
    version = manifest.stat().st_mtime_ns if manifest.is_file() else 0
    key = (str(prepared_dir / prepared.site), version, json.dumps(scaler.to_dict(), sort_keys=True),
           test_fraction, seed, method)
    cached = _CACHE.get(key)
    if cached is None:
        tensors = SiteTensors.from_prepared(prepared, scaler)
        _attach_covariates(tensors, prepared_dir / prepared.site, config)
        if method == "random":
            train_idx, test_idx = split(tensors.n, test_fraction, seed, prepared.y)
        else:  # the study's fixed test set ([split]), prepared at the site: no message chooses it
            from omopfl.splits import rows_from_mask

            if prepared.test_mask is None or prepared.test_mask.shape != (tensors.n,):
                raise SiteFailure("not_prepared")
            train_idx, test_idx = rows_from_mask(prepared.test_mask)
        cached = (tensors, train_idx, test_idx)
        while len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = cached
    return (*cached, int(site.min_cell_count))


def _attach_covariates(tensors: Any, folder: Path, config: Mapping[str, Any]) -> None:
    """A covariate study's sparse matrix (``covariates.npz``) beside the tabular inputs (issue 13b); its width
    must be the approved study's ``model-covariates``."""
    wanted = int(_cfg(config, "model-covariates", int, 0))
    if not wanted:
        return
    from omopfl.covariates import COVARIATES_FILE, load_matrix

    path = folder / COVARIATES_FILE
    if not path.is_file():
        raise SiteFailure("not_prepared")
    matrix = load_matrix(path).matrix
    if matrix.shape != (tensors.n, wanted):
        raise SiteFailure("study_mismatch")
    tensors.covariates = matrix


def _threshold(config: Mapping[str, Any]) -> float:
    value = float(_cfg(config, "threshold", (int, float), 0.5))
    if not 0.0 < value < 1.0:
        raise codec.CodecError("config key 'threshold' must be in (0, 1)")
    return value


def _config(content: RecordDict) -> dict[str, Any]:
    if CONFIG not in content.config_records:
        raise codec.CodecError("config record missing")
    return dict(content.config_records[CONFIG])


def _model(spec: Any, tensors: Any, content: RecordDict) -> Any:
    from omopfl.models import build_model

    if ARRAYS not in content.array_records:
        raise codec.CodecError("arrays record missing")
    model = build_model(spec, tensors.n_features, tensors.n_genes, tensors.image_size,
                        n_covariates=tensors.n_covariates)
    model.load_state_dict(content.array_records[ARRAYS].to_torch_state_dict(), strict=True)
    return model


def _metrics_dp(config: Mapping[str, Any], context: Context) -> tuple[float, Any] | None:
    """``(metrics_epsilon, the study's ledger at this site)`` when the approved study sets DP on metrics."""
    epsilon = config.get("dp-metrics-epsilon")
    if epsilon is None:
        return None
    from omopfl import budget, policy
    from omopfl.config import load_site

    site = load_site(str(context.node_config["site-config"]))
    ledger = budget.Ledger(policy.state_dir(site), str(config[codec.STUDY_HASH_KEY]), float(config["dp-delta"]))
    return float(epsilon), ledger


def _noisy_evaluation(y: Any, prob: Any, min_cell_count: int, threshold: float,
                      dp: tuple[float, Any]) -> MetricRecord:
    """Metrics from the DP-noised confusion matrix (:mod:`omopfl.dp_metrics`), charged to the ledger before
    they leave; withheld (``num-examples`` 0) as the release rule says."""
    from omopfl import dp_metrics

    epsilon, ledger = dp
    result, drawn, _cells = dp_metrics.noisy_evaluation(y, prob, min_cell_count, threshold, epsilon)
    if drawn:
        ledger.charge(metrics=epsilon)
    if result is None:
        return MetricRecord({WEIGHT_KEY: 0})
    return MetricRecord({WEIGHT_KEY: int(result["n"]), **{k: float(result[k]) for k in dp_metrics.NOISY_METRICS}})


def _evaluation(model: Any, tensors: Any, test_idx: Any, min_cell_count: int, threshold: float = 0.5,
                dp: tuple[float, Any] | None = None) -> MetricRecord:
    """Test metrics under the release rule (:func:`omopfl.release.evaluation`: every confusion-matrix cell
    at least ``min_cell_count``), or only ``num-examples`` = 0 (withheld); with ``dp`` (the study's
    ``metrics_epsilon`` and ledger) computed from the noisy cells (:func:`_noisy_evaluation`)."""
    import torch

    from omopfl import release
    from omopfl.models import predict_proba

    if test_idx.size < 4 * min_cell_count:  # four cells of k persons cannot fit
        return MetricRecord({WEIGHT_KEY: 0})
    prob = predict_proba(model, tensors, test_idx)
    y = tensors.y.index_select(0, torch.as_tensor(test_idx)).double().numpy()
    if dp is not None:
        return _noisy_evaluation(y, prob, min_cell_count, threshold, dp)
    clipped = np.clip(prob, 1e-12, 1 - 1e-12)
    loss = float(-np.mean(y * np.log(clipped) + (1 - y) * np.log(1 - clipped)))
    result = release.evaluation(y, prob, loss, min_cell_count, threshold)
    if result is None:
        return MetricRecord({WEIGHT_KEY: 0})
    metrics: dict[str, Any] = {WEIGHT_KEY: int(test_idx.size)}
    for key in EVALUATE_METRICS:
        if key in result:
            metrics[key] = float(result[key])
    return MetricRecord(metrics)


def site_train(content: RecordDict, context: Context) -> RecordDict:
    """A site's reply to ``train`` (see the module docstring)."""
    from omopfl.models import get_weights, train_local

    config = _config(content)
    tensors, train_idx, test_idx, min_cell_count = _tensors_and_split(context, config)
    spec = spec_from_config(config)
    model = _model(spec, tensors, content)
    reply: dict[str, Any] = {}
    if _cfg(config, "evaluate-received", bool, False):
        reply[EVALUATE] = _evaluation(model, tensors, test_idx, min_cell_count, _threshold(config),
                                      _metrics_dp(config, context))
    from omopfl import release

    strategy = _cfg(config, "strategy", str, "")
    if strategy not in ("", "fednova", "scaffold"):
        raise codec.CodecError("config key 'strategy' is not a site-side strategy")
    if not release.may_train(int(train_idx.size), int(test_idx.size), min_cell_count):
        # nothing learnt from so few persons leaves (nor a count whose complement is small): weights as received
        # (under SCAFFOLD with a zero control variate change), weight 0
        arrays = content.array_records[ARRAYS]
        if strategy == "scaffold":
            arrays = _scaffold_reply(arrays, {k: np.zeros_like(v.numpy()) for k, v in _control(content).items()})
        return RecordDict({ARRAYS: arrays, METRICS: MetricRecord({WEIGHT_KEY: 0}), **reply})
    mu = float(_cfg(config, "proximal-mu", (int, float), 0.0))
    server_round = int(_cfg(config, "server-round", int, 1))
    if config.get("dp-sgd") is True:
        return _train_dp(model, tensors, train_idx, config, context, mu, reply)
    local = local_options(config)
    lr = float(_cfg(config, "learning-rate", (int, float), 0.01))
    received = {k: v.detach().clone() for k, v in model.state_dict().items()}
    correction, c_global, c_local = None, None, None
    if strategy == "scaffold":
        c_global = {k: v.numpy() for k, v in _control(content).items()}
        c_local = _load_control(Path(str(config["scaffold-state"])), c_global)
        correction = [c_global[name] - c_local[name] for name, p in model.named_parameters() if p.requires_grad]
    stats = train_local(model, tensors, train_idx, epochs=int(_cfg(config, "local-epochs", int, 1)),
                        batch_size=int(_cfg(config, "batch-size", int, 64)), lr=lr, proximal_mu=mu,
                        global_params=get_weights(model) if mu > 0 else None,
                        seed=int(_cfg(config, "seed", int, 0)) * 1000 + server_round,
                        l2=float(_cfg(config, "model-l2", (int, float), 0.0)), correction=correction, **local)
    metrics: dict[str, Any] = {WEIGHT_KEY: int(stats["n"])}
    if math.isfinite(float(stats["loss"])):
        metrics["loss"] = float(stats["loss"])
    arrays = ArrayRecord(model.state_dict())
    if strategy == "fednova":
        metrics[codec.FEDNOVA_A] = fednova_normaliser(int(stats["steps"]), float(local["momentum"]))
    elif strategy == "scaffold" and c_global is not None and c_local is not None:
        steps = max(1, int(stats["steps"]))
        trained = {k: v.detach().numpy() for k, v in model.state_dict().items()}
        new_local = {k: c_local[k] - c_global[k] + (received[k].numpy() - trained[k]) / (steps * lr)
                     for k in c_global}
        _save_control(Path(str(config["scaffold-state"])), new_local)
        arrays = _scaffold_reply(arrays, {k: new_local[k] - c_local[k] for k in c_global})
    return RecordDict({ARRAYS: arrays, METRICS: MetricRecord(metrics), **reply})


def local_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """The local optimizer settings of a (site-admitted) training config as :func:`omopfl.models.train_local`
    keywords: ``optimizer``, ``momentum``, ``weight_decay``, ``steps`` (issue 14b)."""
    optimizer = _cfg(config, "optimizer", str, "adam")
    if optimizer not in ("adam", "sgd"):
        raise codec.CodecError("config key 'optimizer' must be adam or sgd")
    return {"optimizer": optimizer, "momentum": float(_cfg(config, "momentum", (int, float), 0.0)),
            "weight_decay": float(_cfg(config, "weight-decay", (int, float), 0.0)),
            "steps": int(_cfg(config, "local-steps", int, 0))}


def _control(content: RecordDict) -> ArrayRecord:
    if codec.SCAFFOLD_C not in content.array_records:
        raise codec.CodecError("the SCAFFOLD control variate is missing")
    return content.array_records[codec.SCAFFOLD_C]


def _scaffold_reply(weights: ArrayRecord, change: Mapping[str, np.ndarray]) -> ArrayRecord:
    """The weights and ``dc_i`` in one ArrayRecord (keys ``scaffold-dc/<name>``)."""
    from flwr.app import Array

    out = {k: v for k, v in weights.items()}
    out.update({codec.SCAFFOLD_DC_PREFIX + k: Array(np.ascontiguousarray(v)) for k, v in change.items()})
    return ArrayRecord(out)


def _load_control(path: Path, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The site's ``c_i`` for this run (zero before its first round), shaped like the global ``c``."""
    if path.is_file():
        with np.load(path) as saved:
            if set(saved.files) == set(like) and all(saved[k].shape == like[k].shape for k in like):
                return {k: saved[k].astype(like[k].dtype) for k in like}
        _log.warning("omopfl: the site's SCAFFOLD control variate does not fit this model; starting from zero")
    return {k: np.zeros_like(v) for k, v in like.items()}


def _save_control(path: Path, control: Mapping[str, np.ndarray]) -> None:
    import io

    from omopfl.atomic import write_bytes

    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in control.items()})
    write_bytes(path, buffer.getvalue(), private=True)


def _train_dp(model: Any, tensors: Any, train_idx: Any, config: Mapping[str, Any], context: Context, mu: float,
              reply: dict[str, Any]) -> RecordDict:
    """One round of DP-SGD (:mod:`omopfl.dp`), its noise calibrated so the whole approved study spends its
    ``target_epsilon`` at this site; charged to the study's ledger (:mod:`omopfl.budget`) before the reply
    leaves, refused (``budget_spent``) if the round would overspend.  The training loss is not released
    (it is not private); ``epsilon`` (spent so far on the study) is."""
    from omopfl import budget, dp, policy
    from omopfl.config import load_site
    from omopfl.models import get_weights

    site = load_site(str(context.node_config["site-config"]))
    delta = float(config["dp-delta"])
    spec = dp.DPSpec(float(config["dp-target-epsilon"]), delta, float(config["dp-max-grad-norm"]))
    n_train, batch = int(train_idx.size), int(_cfg(config, "batch-size", int, 64))
    epochs, rounds = int(_cfg(config, "local-epochs", int, 1)), int(config["dp-rounds"])
    noise = dp.calibrate(spec, n_train, batch, epochs, rounds)
    step = dp.round_step(noise, n_train, batch, epochs)
    ledger = budget.Ledger(policy.state_dir(site), str(config[codec.STUDY_HASH_KEY]), delta)
    limit = budget.limit(config.get("dp-budget") or None, site.policy.epsilon_budget)
    if not ledger.fits(limit, dp_step=step) or dp.would_exceed(ledger.read()["dp_sgd"], step, spec.target_epsilon,
                                                                delta):
        raise SiteFailure("budget_spent")
    stats = dp.train_local_dp(model, tensors, train_idx, epochs=epochs, batch_size=batch,
                              lr=float(_cfg(config, "learning-rate", (int, float), 0.01)), noise_multiplier=noise,
                              max_grad_norm=spec.max_grad_norm, proximal_mu=mu,
                              global_params=get_weights(model) if mu > 0 else None)
    total = ledger.charge(dp_step=step)
    metrics = {WEIGHT_KEY: int(stats["n"]), "epsilon": round(float(total), 6)}
    return RecordDict({ARRAYS: ArrayRecord(model.state_dict()), METRICS: MetricRecord(metrics), **reply})


def site_evaluate(content: RecordDict, context: Context) -> RecordDict:
    """A site's reply to ``evaluate``: finite test metrics and the test rows' count."""
    config = _config(content)
    tensors, _train_idx, test_idx, min_cell_count = _tensors_and_split(context, config)
    model = _model(spec_from_config(config), tensors, content)
    return RecordDict({METRICS: _evaluation(model, tensors, test_idx, min_cell_count, _threshold(config),
                                            _metrics_dp(config, context))})


HANDLERS = {"train": site_train, "evaluate": site_evaluate}


def fednova_normaliser(steps: int, momentum: float = 0.0) -> float:
    """FedNova's ``a_i`` for ``steps`` local SGD steps with heavy-ball ``momentum`` (torch's SGD)."""
    tau, rho = int(steps), float(momentum)
    if rho == 0.0:
        return float(tau)
    return (tau - rho * (1.0 - rho**tau) / (1.0 - rho)) / (1.0 - rho)
