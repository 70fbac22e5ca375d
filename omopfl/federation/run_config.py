"""The run configuration of omopfl's Flower apps: one schema, every key and its default.

Each ServerApp reads its keys from Flower's ``context.run_config``; every default, every generated
app ``pyproject.toml`` (``[tool.flwr.app.config]``, the keys ``flwr run --run-config`` may set) and the
package's own ``pyproject.toml`` come from here (``tests/test_run_config.py`` checks they are equal).

``STATS_CONFIG``     the statistics phase (``omopfl stats``; also the first phase of training)
``TRAIN_CONFIG``     training: ``STATS_CONFIG`` plus the round loop's keys
``DISCOVERY_CONFIG`` federated covariate discovery (``omopfl covariates``)
``VALIDATE_CONFIG``  federated external validation (``omopfl evaluate --federated``)

A site never reads these: the coordinator's run config is untrusted at a site, which takes its
settings from the approved study and its own policy.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from omopfl.errors import ConfigError

__all__ = ["STATS_CONFIG", "TRAIN_CONFIG", "DISCOVERY_CONFIG", "VALIDATE_CONFIG", "APPS", "App", "app_pyproject",
           "training_run_config", "with_defaults", "toml_table"]

STATS_CONFIG: Mapping[str, Any] = MappingProxyType({
    "result-path": "",
    "audit-path": "",
    "study-hash": "",
    "min-sites": 1,
    "expected-sites": 0,
    "min-contributing": 1,
    "wait-seconds": 120.0,
    "timeout": 600.0,
    "send-scaler": True,
    "dp-epsilon": 0.0,
    "secure-aggregation": False,
    "dp-delta": 1e-6,
    "dp-bounds": "",
})
"""The statistics ServerApp's keys and defaults."""

TRAIN_CONFIG: Mapping[str, Any] = MappingProxyType({
    **STATS_CONFIG,
    "run-dir": "",
    "audit": False,
    "resume": False,
    "study-name": "",
    "cohort-hashes": "{}",
    "model-kind": "logistic",
    "model-hidden": "[]",
    "model-dropout": "[0.0, 0.0]",
    "model-image-size": 0,
    "model-genes": 0,
    "rounds": 5,
    "local-epochs": 1,
    "batch-size": 64,
    "learning-rate": 0.01,
    "strategy": "fedavg",
    "proximal-mu": 0.0,
    "test-fraction": 0.25,
    "seed": 0,
    "optimizer": "adam",
    "momentum": 0.0,
    "weight-decay": 0.0,
    "local-steps": 0,
    "strategy-options": "{}",
    "round-timeout": 600.0,
    "evaluate-on-train": True,
    "poll-interval": 0.02,
    "tune-pulls": True,
})
"""The training ServerApp's keys and defaults (the statistics phase's keys included)."""

DISCOVERY_CONFIG: Mapping[str, Any] = MappingProxyType({
    "result-path": "",
    "study-hash": "",
    "min-persons": 0,
    "covariate-min-sites": 1,
    "expected-sites": 0,
    "wait-seconds": 120.0,
    "timeout": 600.0,
})
"""The covariate-discovery ServerApp's keys and defaults."""

VALIDATE_CONFIG: Mapping[str, Any] = MappingProxyType({
    "result-path": "",
    "run-dir": "",
    "study-hash": "",
    "rows": "all",
    "min-sites": 1,
    "expected-sites": 0,
    "wait-seconds": 120.0,
    "timeout": 600.0,
})
"""The federated-validation ServerApp's keys and defaults."""

_CLIENTAPP = "omopfl.federation.site.app:app"


@dataclass(frozen=True)
class App:
    """One of omopfl's Flower apps: its name, description, ServerApp component and run config schema."""

    name: str
    description: str
    serverapp: str
    config: Mapping[str, Any]
    clientapp: str = _CLIENTAPP


APPS: Mapping[str, App] = MappingProxyType({
    "stats": App("omopfl-stats", "omopfl federated statistics (global mean/std under minimum cell counts)",
                 "omopfl.federation.coordinator.statistics:app", STATS_CONFIG),
    "train": App("omopfl-train", "omopfl federated training (stats, global scaler, FedAvg/FedProx/FedAdam)",
                 "omopfl.federation.coordinator.training:train_app", TRAIN_CONFIG),
    "covariates": App("omopfl-covariates", "omopfl federated covariate discovery (ids held by >= k persons)",
                      "omopfl.federation.coordinator.discovery:app", DISCOVERY_CONFIG),
    "validate": App("omopfl-validate", "omopfl federated external validation (a run's model at each site)",
                    "omopfl.federation.coordinator.validation:validate_app", VALIDATE_CONFIG),
})
"""omopfl's Flower apps by the command that runs them; ``train`` is the package's own pyproject app."""


def with_defaults(schema: Mapping[str, Any], run_config: Mapping[str, Any]) -> dict[str, Any]:
    """``run_config`` over the schema's defaults (keys the schema does not know are kept as given)."""
    return {**schema, **dict(run_config)}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string (ASCII escapes)


def toml_table(config: Mapping[str, Any]) -> str:
    """``key = value`` lines of a flat TOML table (bool, int, float, str values)."""
    return "".join(f"{key} = {_toml_value(value)}\n" for key, value in config.items())


def app_pyproject(app: str) -> str:
    """The minimal ``pyproject.toml`` that ``flwr run`` needs for one of :data:`APPS`."""
    spec = APPS[app]
    return (
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n\n'
        f'[project]\nname = "{spec.name}"\nversion = "0.1.0"\n'
        f'description = "{spec.description}"\n'
        'license = "Apache-2.0"\ndependencies = []\n\n'
        '[tool.flwr.app]\npublisher = "omopfl"\n\n'
        f'[tool.flwr.app.components]\nserverapp = "{spec.serverapp}"\n'
        f'clientapp = "{spec.clientapp}"\n\n'
        f"[tool.flwr.app.config]\n{toml_table(spec.config)}"
    )


def training_run_config(spec: Any, run_dir: Path, *, min_sites: int, expected_sites: int = 0, audit: bool = False,
                        rounds: int | None = None, strategy: str | None = None, proximal_mu: float | None = None,
                        resume: bool = False, wait_seconds: float = 120.0, timeout: float = 600.0,
                        round_timeout: float = 600.0, evaluate_on_train: bool = True) -> dict[str, Any]:
    """The training ServerApp's run config for a study (every key of :data:`TRAIN_CONFIG`).

    ``rounds``, ``strategy`` and ``proximal_mu`` override the study's ``[training]`` values; a strategy
    that changes what a site computes (FedNova, SCAFFOLD) cannot be swapped in or out here, because the
    sites approved the study's.
    """
    from omopfl.federation import codec
    from omopfl.models import IMAGE_KINDS
    from omopfl.study import SITE_STRATEGIES, STRATEGIES

    def sha(path: Path | None) -> str | None:  # None: a cohort built at each site, fixed by id
        return None if path is None else hashlib.sha256(Path(path).read_bytes()).hexdigest()

    t = spec.training
    if strategy is not None and strategy not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}")
    site_side = {strategy, t.strategy} & set(SITE_STRATEGIES)
    if strategy is not None and strategy != t.strategy and site_side:
        raise ConfigError(f"strategy {strategy!r}: the study trains with {t.strategy!r}, which its sites approved; "
                          "fednova and scaffold change what a site computes: write a study that says so")
    return {
        **TRAIN_CONFIG, "result-path": str(run_dir / "stats_result.json"), "study-hash": spec.hash,
        "min-sites": int(min_sites), "expected-sites": int(expected_sites), "min-contributing": 1,
        "send-scaler": True, "wait-seconds": float(wait_seconds), "timeout": float(timeout),
        "run-dir": str(run_dir), "audit": bool(audit), "resume": bool(resume), "study-name": spec.name,
        "cohort-hashes": json.dumps({"target": sha(spec.target_cohort), "outcome": sha(spec.outcome_cohort)}),
        "model-kind": spec.model.kind, "model-hidden": json.dumps([int(h) for h in spec.model.hidden]),
        "model-dropout": json.dumps([float(d) for d in spec.model.dropout]),
        "model-image-size": int(spec.imaging.size) if spec.imaging.enabled and spec.model.kind in IMAGE_KINDS
        else 0,
        "model-genes": len(spec.omics.genes) if spec.omics.enabled and spec.model.kind == "fusion" else 0,
        "rounds": int(rounds if rounds is not None else t.rounds), "local-epochs": int(t.local_epochs),
        "batch-size": int(t.batch_size), "learning-rate": float(t.learning_rate),
        "strategy": strategy if strategy is not None else t.strategy,
        "proximal-mu": float(proximal_mu if proximal_mu is not None else t.proximal_mu),
        "test-fraction": float(t.test_fraction), "seed": int(t.seed),
        "optimizer": str(t.optimizer), "momentum": float(t.momentum), "weight-decay": float(t.weight_decay),
        "local-steps": int(t.local_steps), "strategy-options": json.dumps(t.server_options(), sort_keys=True),
        "round-timeout": float(round_timeout), "evaluate-on-train": bool(evaluate_on_train),
        **codec.study_dp_config(spec),
        **codec.covariate_settings(spec),  # only for covariate studies (issue 13b)
    }
