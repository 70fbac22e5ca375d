"""Pooled (centralized) baseline vs the federated run on three prepared synthetic sites.

The pooled model uses the pooled scaler and the same per-site train/test split as the federated
run; its AUC must exceed 0.6, and the federated FedAvg AUC (same study, same rounds) must be within
0.1 of the pooled site-weighted AUC (the gap is printed; the target on larger data is 0.02).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from omopfl.config import load_site
from omopfl.federation.train import run_training
from omopfl.pooled import POOLED_FILE, check_poolable, train_pooled

ROOT = Path(__file__).resolve().parents[1]
SITES = ("site_a", "site_b", "site_c")
ROUNDS = 3

for key, value in {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                   "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}.items():
    os.environ.setdefault(key, value)


def _study_text() -> str:
    text = (ROOT / "examples" / "t2dm_hf" / "study.toml").read_text()
    return text.replace('"../../cohorts/', f'"{ROOT}/cohorts/').replace("enabled = true", "enabled = false")


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three prepared synthetic sites with their adapters (as in test_federated_training)."""
    from omopfl.db import make_engine
    from omopfl.prepare import prepare_site
    from omopfl.study import load_study
    from omopfl.synth import run_synth

    tmp = tmp_path_factory.mktemp("pooled")
    (tmp / "study.toml").write_text(_study_text())
    study = load_study(tmp / "study.toml")
    run_synth(tmp / "synth", n_sites=3, persons=[1200, 800, 450], seed=11, image_share=0.0, omics_share=0.0,
              progress=False)
    prepared_dir = tmp / "prepared"
    adapters = []
    for name in SITES:
        adapter = tmp / "synth" / "adapters" / f"{name}.toml"
        site = load_site(adapter)
        engine = make_engine(site.database_url())
        try:
            prepare_site(engine, site, study, prepared_dir)
        finally:
            engine.dispose()
        adapters.append(adapter)
    return {"tmp": tmp, "study": tmp / "study.toml", "prepared_dir": prepared_dir, "adapters": adapters}


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
    assert final["eval_n"] == total_test
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
