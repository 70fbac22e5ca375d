"""One run-config schema (issue 15): pyproject, every generated app and every reader come from it."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from omopfl.federation import run_config as schema

ROOT = Path(__file__).resolve().parent.parent


def test_project_pyproject_is_the_training_app_of_the_schema() -> None:
    """`[tool.flwr.app]` of the package is the training app omopfl runs: same components, same keys, defaults."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    train = schema.APPS["train"]
    assert project["components"] == {"serverapp": train.serverapp, "clientapp": train.clientapp}
    assert project["config"] == dict(schema.TRAIN_CONFIG)


@pytest.mark.parametrize("name", sorted(schema.APPS))
def test_every_generated_app_declares_its_schema(name: str) -> None:
    """The pyproject `flwr run` gets for each app names its components and exactly its schema's keys."""
    app = schema.APPS[name]
    generated = tomllib.loads(schema.app_pyproject(name))["tool"]["flwr"]["app"]
    assert generated["components"] == {"serverapp": app.serverapp, "clientapp": app.clientapp}
    assert generated["config"] == dict(app.config)
    module, _, attribute = app.serverapp.partition(":")
    import importlib

    from flwr.serverapp import ServerApp

    assert isinstance(getattr(importlib.import_module(module), attribute), ServerApp)


def test_training_includes_the_statistics_phase_and_the_schema_is_read_only() -> None:
    assert set(schema.STATS_CONFIG) < set(schema.TRAIN_CONFIG)
    assert all(schema.TRAIN_CONFIG[k] == v for k, v in schema.STATS_CONFIG.items())
    with pytest.raises(TypeError):
        schema.TRAIN_CONFIG["rounds"] = 99  # type: ignore[index]


def test_readers_take_their_defaults_from_the_schema() -> None:
    """An empty run config reads as the schema's defaults (no reader keeps defaults of its own)."""
    from omopfl.federation.coordinator.discovery import DiscoverySettings
    from omopfl.federation.coordinator.statistics import Settings

    stats = Settings.from_run_config({})
    assert (stats.min_sites, stats.expected_sites, stats.min_contributing, stats.wait_seconds, stats.timeout,
            stats.send_scaler, stats.secure_aggregation, stats.dp) == (
        schema.STATS_CONFIG["min-sites"], schema.STATS_CONFIG["expected-sites"],
        schema.STATS_CONFIG["min-contributing"], schema.STATS_CONFIG["wait-seconds"], schema.STATS_CONFIG["timeout"],
        schema.STATS_CONFIG["send-scaler"], schema.STATS_CONFIG["secure-aggregation"], None)
    discovery = DiscoverySettings.from_run_config({"result-path": "r", "study-hash": "h"})
    assert (discovery.min_persons, discovery.covariate_min_sites, discovery.wait_seconds, discovery.timeout) == (
        schema.DISCOVERY_CONFIG["min-persons"], schema.DISCOVERY_CONFIG["covariate-min-sites"],
        schema.DISCOVERY_CONFIG["wait-seconds"], schema.DISCOVERY_CONFIG["timeout"])


def test_a_studys_training_run_config_sets_only_schema_keys() -> None:
    """What `omopfl server`/`train --simulate` send is the schema filled from the study (plus the study's
    DP and covariate keys, which the sites check against the approved study)."""
    from omopfl.study import load_study

    spec = load_study(ROOT / "examples" / "t2dm_hf" / "study.toml")
    config = schema.training_run_config(spec, Path("/tmp/run"), min_sites=3, rounds=2)
    assert set(schema.TRAIN_CONFIG) <= set(config)
    assert config["rounds"] == 2 and config["min-sites"] == 3 and config["study-hash"] == spec.hash
    assert config["model-kind"] == spec.model.kind and config["strategy"] == spec.training.strategy
    with pytest.raises(Exception, match="strategy must be one of"):
        schema.training_run_config(spec, Path("/tmp/run"), min_sites=1, strategy="nonsense")


def test_toml_table_round_trips_every_value_kind() -> None:
    values = {"a": True, "b": 3, "c": 1e-6, "d": 'say "hi"\n\\', "e": ""}
    assert tomllib.loads(schema.toml_table(values)) == values
