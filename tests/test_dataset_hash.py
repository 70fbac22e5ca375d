"""Dataset hash apart from the study hash (issue 14).

A site approves the whole study (its hash); the prepared dataset carries the DATASET hash, which
leaves out [study], [model], [training] and [privacy].  So a study whose learning rate changed is
trained, once approved, on the datasets prepared for the earlier version; a changed feature is not,
and the coordinator stops in one line naming the sites, the cause and what to do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, cli_study_text

from omopfl.study import load_study


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_dataset_hash_covers_what_defines_the_dataset(tmp_path: Path) -> None:
    base_text = cli_study_text()
    base = load_study(_write(tmp_path, "base.toml", base_text))
    training_only = [
        base_text.replace("learning_rate = 0.05", "learning_rate = 0.01"),
        base_text.replace("rounds = 5", "rounds = 9").replace('kind = "logistic"', 'kind = "mlp"'),
        base_text + "\n[privacy]\nbudget_epsilon = 3.0\n",
        "# a comment\n" + base_text.replace('description = "', 'description = "v2 '),
    ]
    for i, text in enumerate(training_only):
        spec = load_study(_write(tmp_path, f"t{i}.toml", text))
        assert spec.hash != base.hash and spec.dataset_hash == base.dataset_hash, i
    changed = [
        base_text.replace("window = [-3650, 0]", "window = [-3000, 0]", 1),
        base_text.replace("time_at_risk = [1, 365]", "time_at_risk = [1, 730]"),
        base_text + '\n[split]\nmethod = "hash"\n',
    ]
    for i, text in enumerate(changed):
        if "[split]" in text:
            text = text.replace("test_fraction = 0.25\n", "")
        spec = load_study(_write(tmp_path, f"d{i}.toml", text))
        assert spec.dataset_hash != base.dataset_hash, i
    # the bytes of a referenced cohort definition count, not only its name
    copy = tmp_path / "cohorts"
    copy.mkdir()
    for name in ("incident_t2dm.yaml", "heart_failure.yaml"):
        (copy / name).write_text((ROOT / "cohorts" / name).read_text())
    local = _write(tmp_path, "local.toml", base_text.replace(f"{ROOT}/cohorts/", "cohorts/"))
    before = load_study(local).dataset_hash
    (copy / "incident_t2dm.yaml").write_text((copy / "incident_t2dm.yaml").read_text() + "\n# edited\n")
    assert load_study(local).dataset_hash != before


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "400"}
    return subprocess.run([sys.executable, "-m", "omopfl.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def test_training_settings_change_needs_approval_not_preparation(prepared_sites_factory) -> None:
    from omopfl import policy
    from omopfl.config import load_site
    from omopfl.errors import FederationError
    from omopfl.federation.local import run_training

    fed = prepared_sites_factory("dataset_hash")
    prepared_before = {a.stem: (fed["prepared_dir"] / a.stem / "manifest.json").read_bytes() for a in fed["adapters"]}
    text = fed["study"].read_text()
    assert "learning_rate = 0.05" in text
    study = _write(fed["tmp"], "study_lr.toml", text.replace("learning_rate = 0.05", "learning_rate = 0.02"))
    spec = load_study(study)
    assert spec.hash != fed["study_hash"] and spec.dataset_hash == load_study(fed["study"]).dataset_hash

    # not approved yet: refused, in one line naming the sites and what to do
    with pytest.raises(FederationError) as refused:
        run_training(study, fed["adapters"], fed["prepared_dir"], out_dir=fed["tmp"] / "run0", rounds=1)
    message = str(refused.value)
    assert "\n" not in message and "site_a, site_b, site_c: study not approved (study_not_approved)" in message
    assert "omopfl sites approve" in message

    for adapter in fed["adapters"]:
        policy.approve(load_site(adapter), spec)
    run_dir = fed["tmp"] / "run"
    manifest = run_training(study, fed["adapters"], fed["prepared_dir"], out_dir=run_dir, rounds=2)
    assert manifest["study_hash"] == spec.hash and manifest["sites"] == ["site_a", "site_b", "site_c"]
    assert manifest["training"]["learning_rate"] == 0.02
    assert json.loads((run_dir / "scaler.json").read_text())["study_hash"] == spec.hash
    for adapter in fed["adapters"]:  # no re-preparation: the prepared datasets are as they were
        assert (fed["prepared_dir"] / adapter.stem / "manifest.json").read_bytes() == prepared_before[adapter.stem]
        # the scaler kept beside the dataset is the new study's (check_scaler compares with the message's study)
        kept = json.loads((fed["prepared_dir"] / adapter.stem / "scaler.json").read_text())
        assert kept["study_hash"] == spec.hash


def test_changed_feature_is_refused_in_one_line(prepared_sites_factory) -> None:
    from omopfl import policy
    from omopfl.config import load_site

    fed = prepared_sites_factory("dataset_feature")
    text = fed["study"].read_text()
    study = _write(fed["tmp"], "study_feature.toml", text.replace("window = [-3650, 0]", "window = [-3000, 0]", 1))
    spec = load_study(study)
    assert spec.dataset_hash != load_study(fed["study"]).dataset_hash
    for adapter in fed["adapters"]:
        policy.approve(load_site(adapter), spec)
    args = ["train", "--simulate", "--study", study, "--prepared", fed["prepared_dir"], "--out", fed["tmp"] / "run"]
    for adapter in fed["adapters"]:
        args += ["--site", adapter]
    result = _cli(args)
    assert result.returncode == 7, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("omopfl: error")]
    assert len(errors) == 1, result.stderr
    line = errors[0]
    assert "no global scaler" in line and "site_a, site_b, site_c: prepared for another study (study_mismatch)" in line
    assert "omopfl prepare" in line and "no re-preparation" in line
