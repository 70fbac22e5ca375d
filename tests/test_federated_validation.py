"""Federated external validation driven by the coordinator (issue 14).

The coordinator sends a finished run's model and scaler in ``query.validate`` through the real
Flower message path (InProcessGrid: protobuf both ways) to every site; each approved site computes
the PLP measures of :mod:`omopfl.external_validation` on its own prepared data under its release
rule, audited.  A site that never trained gets exactly what ``omopfl evaluate`` run locally at that
site gives; an unapproved study, a wrong feature list and hostile weights are refused with fixed codes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from omopfl.federation.local import run_validation


@pytest.fixture(scope="module")
def trained(prepared_sites_factory) -> dict:
    """Three approved sites; a run trained at site_a and site_b only."""
    from omopfl.federation.local import run_training

    fed = prepared_sites_factory("fed_validation")
    run_dir = fed["tmp"] / "run"
    run_training(fed["study"], fed["adapters"][:2], fed["prepared_dir"], out_dir=run_dir, rounds=2, min_sites=2)
    return {**fed, "run_dir": run_dir}


def _cli(args: list) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "omopfl.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "400"}, timeout=600)


def test_a_site_that_never_trained_gets_the_local_result(trained, tmp_path: Path) -> None:
    from omopfl import audit
    from omopfl.config import load_site
    from omopfl.federation.site.audit_trail import audit_path

    result = run_validation(trained["run_dir"], trained["adapters"], trained["prepared_dir"],
                            out=tmp_path / "federated.json")
    assert sorted(result["sites"]) == ["site_a", "site_b", "site_c"] and result["refused"] == []
    assert json.loads((tmp_path / "federated.json").read_text()) == result

    local = tmp_path / "local_c"  # omopfl evaluate, run by site_c's data engineer at the site
    done = _cli(["evaluate", "--run", trained["run_dir"], "--site", trained["adapters"][2], "--prepared",
                 trained["prepared_dir"], "--out", local])
    assert done.returncode == 0, done.stderr
    expected = json.loads((local / "validation.json").read_text())
    assert not expected.get("withheld") and expected["n"] > 0
    assert result["sites"]["site_c"] == expected
    # every site's reply is in its audit log, as sent
    for adapter in trained["adapters"]:
        entries = [e for e in audit.read(audit_path(load_site(adapter))) if e["message_type"] == "query.validate"]
        assert entries and entries[-1]["outcome"] == "sent" and entries[-1]["records"][0]["name"] == "omopfl.validation"


def test_cli_federated_writes_json_report_and_plots(trained, tmp_path: Path) -> None:
    out = tmp_path / "validation"
    args = ["evaluate", "--run", trained["run_dir"], "--federated", "--simulate", "--prepared",
            trained["prepared_dir"], "--out", out]
    for adapter in trained["adapters"]:
        args += ["--site", adapter]
    done = _cli(args)
    assert done.returncode == 0, done.stderr
    assert "site_c:" in done.stdout and "AUC" in done.stdout
    assert {p.name for p in out.iterdir()} >= {"federated_validation.json", "federated_validation.md", "site_a",
                                               "site_b", "site_c"}
    for name in ("site_a", "site_c"):
        assert {p.name for p in (out / name).iterdir()} == {"validation.json", "validation.md", "roc.png",
                                                            "calibration.png"}
    report = (out / "federated_validation.md").read_text()
    assert "| site_c |" in report and "## External validation at site_c" in report and "site_c/roc.png" in report


def _copy_run(trained: dict, tmp_path: Path, name: str) -> Path:
    run = tmp_path / name
    shutil.copytree(trained["run_dir"], run)
    return run


def _codes(result: dict) -> dict[str, str]:
    return {r.get("site") or str(r["node"]): r["code"] for r in result["refused"]}


def test_unapproved_sites_refuse(trained, prepared_sites_factory, tmp_path: Path) -> None:
    from omopfl import policy
    from omopfl.config import load_site
    from omopfl.study import load_study

    other = prepared_sites_factory("fed_validation_unapproved", approve=False)
    policy.approve(load_site(other["adapters"][0]), load_study(other["study"]))  # site_a only
    result = run_validation(trained["run_dir"], other["adapters"], other["prepared_dir"], out=tmp_path / "r.json")
    assert sorted(result["sites"]) == ["site_a"]
    assert _codes(result) == {"site_b": "study_not_approved", "site_c": "study_not_approved"}


def test_wrong_features_and_hostile_models_are_refused(trained, tmp_path: Path) -> None:
    scaler = json.loads((trained["run_dir"] / "scaler.json").read_text())
    swapped = _copy_run(trained, tmp_path, "swapped")
    names = scaler["feature_names"]
    names[0], names[1] = names[1], names[0]
    (swapped / "scaler.json").write_text(json.dumps({**scaler, "feature_names": names}))
    result = run_validation(swapped, trained["adapters"], trained["prepared_dir"], out=tmp_path / "a.json")
    assert result["sites"] == {} and set(_codes(result).values()) == {"feature_mismatch"}

    with np.load(trained["run_dir"] / "model.npz") as saved:
        state = {k: np.array(saved[k]) for k in saved.files}
    wide = _copy_run(trained, tmp_path, "wide")  # a weight of another shape (more inputs than the study has)
    np.savez(wide / "model.npz", **{**state, "linear.weight": np.zeros((1, state["linear.weight"].shape[1] + 1),
                                                                      dtype=np.float32)})
    nan = _copy_run(trained, tmp_path, "nan")
    np.savez(nan / "model.npz", **{**state, "linear.bias": np.array([np.nan], dtype=np.float32)})
    extra = _copy_run(trained, tmp_path, "extra")
    np.savez(extra / "model.npz", **{**state, "hidden.weight": np.ones((3, 3), dtype=np.float32)})
    for run in (wide, nan, extra):
        result = run_validation(run, trained["adapters"], trained["prepared_dir"], out=tmp_path / f"{run.name}.json")
        assert result["sites"] == {} and set(_codes(result).values()) == {"bad_request"}, run.name

    kind = _copy_run(trained, tmp_path, "kind")  # the approved study is logistic
    manifest = json.loads((kind / "manifest.json").read_text())
    manifest["model"] = {**manifest["model"], "kind": "mlp", "hidden": [4], "dropout": [0.1]}
    (kind / "manifest.json").write_text(json.dumps(manifest))
    result = run_validation(kind, trained["adapters"], trained["prepared_dir"], out=tmp_path / "kind.json")
    assert result["sites"] == {} and set(_codes(result).values()) == {"settings_mismatch"}

    # the CLI: no site validated -> one line naming the cause, exit 7
    args = ["evaluate", "--run", swapped, "--federated", "--simulate", "--prepared", trained["prepared_dir"],
            "--out", tmp_path / "cli"]
    for adapter in trained["adapters"]:
        args += ["--site", adapter]
    done = _cli(args)
    errors = [line for line in done.stderr.splitlines() if line.startswith("omopfl: error")]
    assert done.returncode == 7 and len(errors) == 1, done.stderr
    assert "no site validated the model" in errors[0] and "features differ (feature_mismatch)" in errors[0]


def test_federated_validation_on_a_loopback_deployment(trained, tmp_path: Path) -> None:
    """The same exchange through a real SuperLink and one SuperNode per site (omopfl's site runtime)."""
    inprocess = run_validation(trained["run_dir"], trained["adapters"], trained["prepared_dir"],
                               out=tmp_path / "inprocess.json")
    deployed = run_validation(trained["run_dir"], trained["adapters"], trained["prepared_dir"],
                              out=tmp_path / "deployed.json", mode="deployment", timeout=300)
    assert deployed["refused"] == [] and deployed["sites"] == inprocess["sites"]
