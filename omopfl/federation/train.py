"""Federated training on one machine: every site's ClientApp and the training ServerApp.

The parts live in their own modules:

* site side: :mod:`omopfl.federation.site_train` (``train``/``evaluate`` handlers on the site's
  ClientApp) and :mod:`omopfl.federation.worker` (the long-lived worker ``omopfl train --site``
  runs beside its SuperNode);
* server side: :mod:`omopfl.federation.server_train` (statistics -> scaler -> checkpointed rounds
  of Flower's FedAvg/FedProx/FedAdam -> run directory);
* processes: :mod:`omopfl.federation.deploy` (SuperLink, SuperNodes through ``omopfl train
  --site``, ``flwr run``) and :mod:`omopfl.federation.server` (``omopfl server``).

:func:`run_training` runs them together on this machine, in process (:class:`InProcessGrid`, no
network) or as a loopback deployment (a SuperLink and one ``omopfl train --site`` SuperNode per
adapter, then ``flwr run``): the same ServerApp and ClientApp code either way.

Run directory (``out_dir``)
    ``model.npz`` (state-dict name -> array), ``scaler.json``, ``features.json``, ``stats.json``,
    ``metrics.json`` / ``metrics.csv`` (per round: sites, aggregated train loss, evaluate loss/auc/
    accuracy/f1/kappa of the round's global model, n, seconds, bytes sent/received),
    ``checkpoint.json``/``.npz`` (last completed round), ``manifest.json`` (study name and hash,
    cohort definition hashes, model and training spec, sites, dropped sites, file sha256s, timings,
    bytes) and, when ``audit`` is on, ``audit.json`` (every site reply as received: record names,
    keys, array shapes, metric values).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omopfl.federation.server_train import TRAIN_CONFIG, train_app, write_run_dir
from omopfl.federation.site_app import app as client_app
from omopfl.federation.site_train import (
    EVALUATE_METRICS,
    EVALUATE_REPLY_KEYS,
    TRAIN_REPLY_KEYS,
    site_evaluate,
    site_train,
)

__all__ = ["client_app", "train_app", "run_training", "TRAIN_CONFIG", "TRAIN_REPLY_KEYS", "EVALUATE_REPLY_KEYS",
           "EVALUATE_METRICS", "site_train", "site_evaluate", "write_run_dir", "MODES", "quiet_flower_logs"]

MODES = ("inprocess", "deployment")


def quiet_flower_logs() -> None:
    """Flower's own INFO lines (sampling, aggregation counts) off, omopfl's progress lines and warnings on."""
    import logging

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.startswith("flwr.omopfl")

    for handler in logging.getLogger("flwr").handlers:
        if keep not in handler.filters:
            handler.addFilter(keep)


def _failure(run_dir: Path) -> str:
    """The message the ServerApp stopped with (``live.json`` phase ``failed``), or ``""``."""
    from omopfl.federation.run_view import LIVE_FILE

    try:
        state = json.loads((run_dir / LIVE_FILE).read_text())
    except (OSError, ValueError):
        return ""
    return " ".join(str(state.get("message", "")).split()) if isinstance(state, dict) and \
        state.get("phase") == "failed" else ""


def _run_inprocess(adapters: list[Path], prepared: Path, run_config: dict[str, Any], *,
                   grid_class: Any = None) -> None:
    """The training ServerApp in process (:func:`omopfl.federation.runner.run_inprocess`); its own failures
    become one-line :class:`FederationError` (sites send fixed codes only)."""
    from omopfl.errors import FederationError, RoundsFailed
    from omopfl.federation.runner import run_inprocess

    try:
        run_inprocess(train_app, adapters, prepared, run_config, grid_class=grid_class)
    except (RoundsFailed, ValueError) as exc:
        raise FederationError(f"the run failed: {exc}") from None


def run_training(study: str | Path, adapters: Sequence[str | Path], prepared_dir: str | Path, *,
                 mode: str = "inprocess", out_dir: str | Path, rounds: int | None = None,
                 strategy: str | None = None, proximal_mu: float | None = None, audit: bool = False,
                 timeout: float = 900.0, keep_logs: bool = False, resume: bool = False,
                 min_sites: int | None = None, round_timeout: float = 600.0, evaluate_on_train: bool = True,
                 tuned: bool = True, extra_run_config: dict[str, Any] | None = None) -> dict[str, Any]:
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
        ``"inprocess"`` or ``"deployment"`` (loopback SuperLink and ``omopfl train --site``
        SuperNodes), see the module docstring.
    out_dir:
        The run directory (module docstring).
    rounds, strategy, proximal_mu:
        Override the study's ``[training]`` values (the study file, and so its hash, stays the same).
    audit:
        Also write ``audit.json``: every site reply, as received.
    timeout:
        Deployment: seconds for the whole ``flwr run``.
    keep_logs:
        Deployment: keep the working folder (Flower logs, app, run config).
    resume:
        Continue from the run directory's checkpoint.
    min_sites:
        Fewest sites a round may go on with (default: every adapter).
    round_timeout:
        Seconds to wait for a round's replies before the missing sites are dropped.
    evaluate_on_train:
        Let each ``train`` message carry the evaluation of the previous global model (one exchange
        per round); False sends separate ``evaluate`` messages (Flower's default pattern).
    tuned:
        Deployment: start the SuperNodes with omopfl's shorter polling (False: Flower's stock).
    extra_run_config:
        Further run config values (e.g. ``poll-interval``).

    Returns
    -------
    dict
        The run's manifest (also ``out_dir/manifest.json``) plus ``runner`` (mode, seconds).
    """
    from omopfl.config import load_site
    from omopfl.errors import ConfigError, FederationError
    from omopfl.federation.server import training_pyproject, training_run_config
    from omopfl.study import load_study

    if mode not in MODES:
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
    if resume and not (run_dir / "checkpoint.json").is_file():
        raise ConfigError(f"--resume: {run_dir / 'checkpoint.json'} not found: resume needs the run directory "
                          "of an interrupted run")
    run_config = training_run_config(
        spec, run_dir, min_sites=min_sites or len(adapters), expected_sites=len(adapters), audit=audit,
        rounds=rounds, strategy=strategy, proximal_mu=proximal_mu, resume=resume, round_timeout=round_timeout,
        evaluate_on_train=evaluate_on_train)
    run_config.update(extra_run_config or {})
    prepared = Path(prepared_dir).resolve()
    (run_dir / "manifest.json").unlink(missing_ok=True)
    timings: dict[str, float] = {}
    if mode == "deployment":
        from omopfl.federation.runner import run_deployment

        work = Path(tempfile.mkdtemp(prefix="omopfl-train-"))
        ok = False
        try:
            engine = run_deployment(adapters, prepared, run_config, None, work, timeout, timings,
                                     app_pyproject=training_pyproject(), tuned=tuned)
            ok = True
        finally:
            if ok and not keep_logs:
                shutil.rmtree(work, ignore_errors=True)
    else:
        _run_inprocess(adapters, prepared, run_config)
        engine = "inprocess (InProcessGrid)"
    if not (run_dir / "manifest.json").is_file():
        failed = _failure(run_dir)  # a deployment's ServerApp left its one-line cause in the live view
        if failed:
            raise FederationError(f"the run failed: {failed}")
        raise FederationError(f"the training ServerApp wrote no run directory at {run_dir}")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["runner"] = {"mode": mode, "engine": engine, "seconds": round(time.perf_counter() - started, 3),
                          "phases": timings}
    return manifest
