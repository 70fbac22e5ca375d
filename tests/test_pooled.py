"""Pooled (centralized) baseline vs the federated run on three prepared synthetic sites.

The pooled model uses the pooled scaler and the same per-site train/test split as the federated
run; its AUC must exceed 0.6, and the federated FedAvg AUC (same study, same rounds) must be within
0.1 of the pooled site-weighted AUC (the gap is printed; the target on larger data is 0.02).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from omopfl.config import load_site
from omopfl.federation.local import run_training
from omopfl.pooled import POOLED_FILE, check_poolable, train_pooled

ROOT = Path(__file__).resolve().parents[1]
SITES = ("site_a", "site_b", "site_c")
ROUNDS = 3

@pytest.fixture(scope="module")
def federation(prepared_sites_factory) -> dict[str, Any]:
    """Three prepared synthetic sites with their adapters (tests/conftest.py)."""
    return prepared_sites_factory("pooled")


def test_pooled_baseline_matches_the_federated_run(federation) -> None:
    from omopfl.models import split
    from omopfl.prepare import load_prepared
    from omopfl.study import load_study

    out = federation["tmp"] / "pooled"
    result = train_pooled(federation["study"], federation["adapters"], federation["prepared_dir"],
                          out_dir=out, rounds=ROUNDS)
    assert json.loads((out / POOLED_FILE).read_text()) == json.loads(json.dumps(result))
    metrics = result["metrics"]
    assert set(metrics["sites"]) == set(SITES)
    assert metrics["pooled"]["auc"] > 0.6 and metrics["site_weighted"]["auc"] > 0.6, metrics
    assert np.isfinite(metrics["train_loss"])

    # same per-site split as the federated sites use
    t = load_study(federation["study"]).training
    assert result["config"]["training"]["epochs"] == ROUNDS * t.local_epochs
    total_test = 0
    for name in SITES:
        prepared = load_prepared(federation["prepared_dir"] / name)
        train_idx, test_idx = split(prepared.n, t.test_fraction, t.seed, prepared.y)
        assert result["config"]["rows"][name] == {"train": int(train_idx.size), "test": int(test_idx.size)}
        assert metrics["sites"][name]["n"] == test_idx.size
        total_test += int(test_idx.size)
    assert metrics["pooled"]["n"] == metrics["site_weighted"]["n"] == total_test
    assert metrics["train_n"] == sum(r["train"] for r in result["config"]["rows"].values())

    manifest = run_training(federation["study"], federation["adapters"], federation["prepared_dir"],
                            mode="inprocess", out_dir=federation["tmp"] / "federated", rounds=ROUNDS)
    final = manifest["final"]
    assert 0 < final["eval_n"] <= total_test  # sites whose confusion cells are below k withhold (omopfl.release)
    gap = metrics["site_weighted"]["auc"] - final["eval_auc"]
    print(json.dumps({"federated_auc": final["eval_auc"], "pooled_site_weighted_auc": metrics["site_weighted"]["auc"],
                      "pooled_auc": metrics["pooled"]["auc"], "gap": gap,
                      "federated_loss": final["eval_loss"], "pooled_loss": metrics["site_weighted"]["loss"]}))
    assert abs(gap) < 0.1


def test_pooling_is_refused_on_a_non_synthetic_cdm(federation, tmp_path: Path) -> None:
    import dataclasses

    import duckdb

    from omopfl.errors import ConfigError

    site = load_site(federation["adapters"][0])
    assert "synthetic" in check_poolable(site)
    db = tmp_path / "real.duckdb"
    with duckdb.connect(str(db)) as con:
        con.execute(f'CREATE SCHEMA IF NOT EXISTS "{site.cdm_schema}"')
        con.execute(f'CREATE TABLE "{site.cdm_schema}".cdm_source '
                    "(cdm_source_name VARCHAR, source_description VARCHAR)")
        con.execute(f"INSERT INTO \"{site.cdm_schema}\".cdm_source VALUES ('Hospital EHR', 'production data')")
    real = dataclasses.replace(site, duckdb_path=db)
    with pytest.raises(ConfigError, match="synthetic or test data"):
        check_poolable(real)


def test_cli_pooled_flag_refuses_without_study(capsys) -> None:
    from omopfl.cli import main

    with pytest.raises(SystemExit) as info:
        main(["train", "--pooled"])
    assert info.value.code == 2 and "--study" in capsys.readouterr().err


def test_cli_simulate_with_pooled_reports_both(federation, capsys) -> None:
    from omopfl.cli import main

    run_dir = federation["tmp"] / "cli_both"
    args = ["train", "--simulate", "--pooled", "--study", str(federation["study"]), "--prepared",
            str(federation["prepared_dir"]), "--out", str(run_dir), "--rounds", "2"]
    for adapter in federation["adapters"]:
        args += ["--site", str(adapter)]
    main(args)
    printed = capsys.readouterr().out
    assert "pooled baseline on the same split: AUC" in printed and "trained logistic" in printed
    report = (run_dir / "report.md").read_text()
    assert "## Federated beside the pooled baseline" in report
    pooled = json.loads((run_dir / POOLED_FILE).read_text())["metrics"]["site_weighted"]["auc"]
    assert f"| {pooled:.3f} |" in report
    assert POOLED_FILE in json.loads((run_dir / "manifest.json").read_text())["files"]
