"""Federated training with real Flower (in-process grid): stats -> scaler -> FedAvg/FedProx rounds.

Three synthetic sites are generated and prepared on DuckDB (imaging and omics off).  A logistic
model trained for three FedAvg rounds must reach a weighted test AUC above 0.6 (the generator's
Bayes AUC is about 0.85), the run directory must hold the model, scaler, features, metrics and
manifest, and every message a site sent during training must hold only the model's weights, the
allowed metrics and its row count.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import prepare_and_approve, run_omopfl, serve_at_site

from omopfl.federation.local import run_training
from omopfl.federation.site.training import EVALUATE_REPLY_KEYS, TRAIN_REPLY_KEYS
from omopfl.prepare import load_prepared

ROOT = Path(__file__).resolve().parents[1]
SITES = ("site_a", "site_b", "site_c")

@pytest.fixture(scope="module")
def federation(prepared_sites_factory) -> dict[str, Any]:
    """Three prepared synthetic sites with their adapters (tests/conftest.py)."""
    return prepared_sites_factory("training")


def _numbers(value: Any) -> list[float]:
    if isinstance(value, list):
        return [v for item in value for v in _numbers(item)]
    if isinstance(value, dict):
        return [v for item in value.values() for v in _numbers(item)]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [value]
    return []


def test_fedavg_inprocess_learns_and_writes_the_run_dir(federation) -> None:
    from omopfl.models import build_model
    from omopfl.study import load_study

    run_dir = federation["tmp"] / "run_fedavg"
    manifest = run_training(federation["study"], federation["adapters"], federation["prepared_dir"],
                            mode="inprocess", out_dir=run_dir, rounds=3, audit=True)
    print(json.dumps({"seconds": manifest["seconds"], "runner": manifest["runner"], "final": manifest["final"]}))
    for name in ("model.npz", "scaler.json", "features.json", "stats.json", "metrics.json", "metrics.csv",
                 "manifest.json", "audit.json"):
        assert (run_dir / name).is_file(), name
    assert manifest["study_hash"] == federation["study_hash"]
    assert set(manifest["cohort_hashes"]) == {"target", "outcome"}
    assert manifest["sites"] == list(SITES) and manifest["training"]["rounds"] == 3
    assert set(manifest["files"]) >= {"model.npz", "scaler.json", "metrics.csv"}

    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["seconds"] is not None and r["seconds"] > 0 for r in rounds)
    with (run_dir / "metrics.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 3
    final = rounds[-1]
    assert final["eval_auc"] is not None and final["eval_auc"] > 0.6, rounds
    assert final["train_loss"] is not None and np.isfinite(final["train_loss"])

    # the model file loads into the study's model
    spec = load_study(federation["study"])
    features = json.loads((run_dir / "features.json").read_text())["feature_names"]
    model = build_model(spec.model, len(features))
    with np.load(run_dir / "model.npz") as saved:
        assert set(saved.files) == set(model.state_dict())
        for name, tensor in model.state_dict().items():
            assert saved[name].shape == tuple(tensor.shape)
    assert json.loads((run_dir / "scaler.json").read_text())["study_hash"] == federation["study_hash"]

    # every site reply of the training phase: weights, allowed metrics and row counts only
    shapes = {name: list(t.shape) for name, t in model.state_dict().items()}
    sizes = {}
    person_ids: set[float] = set()
    for name in SITES:
        prepared = load_prepared(federation["prepared_dir"] / name)
        sizes[name] = prepared.n
        person_ids |= {float(p) for p in np.load(federation["prepared_dir"] / name / "persons.npy")}
    replies = json.loads((run_dir / "audit.json").read_text())["replies"]
    kinds = [r["message_type"] for r in replies]
    # statistics + scaler, one train exchange per round, one final evaluate exchange
    assert kinds.count("query.stats") == kinds.count("query.scaler") == len(SITES)
    assert kinds.count("train") == 3 * len(SITES) and kinds.count("evaluate") == len(SITES)
    with_evaluation = 0
    for reply in replies:
        assert "content" in reply, reply  # no Flower-level error
        content = reply["content"]
        if reply["message_type"].startswith("query."):
            continue  # the statistics replies are checked in tests/test_federated_stats.py
        if reply["message_type"] == "train":
            assert set(content) in ({"arrays", "metrics"}, {"arrays", "metrics", "evaluate"}), set(content)
            assert {k: v["shape"] for k, v in content["arrays"].items()} == shapes
            allowed = TRAIN_REPLY_KEYS
            with_evaluation += "evaluate" in content
        else:
            assert reply["message_type"] == "evaluate" and set(content) == {"metrics"}
            allowed = EVALUATE_REPLY_KEYS
        for record in set(content) - {"arrays"}:
            metrics = content[record]
            assert set(metrics) <= allowed[record] and "num-examples" in metrics, metrics
            if metrics["num-examples"] == 0:  # withheld by the release rule (a cell below the site's k)
                assert set(metrics) == {"num-examples"}, metrics
                continue
            assert 0 < metrics["num-examples"] <= max(sizes.values())
            assert all(isinstance(v, int | float) and np.isfinite(v) for v in metrics.values())
            others = {k: v for k, v in metrics.items() if k != "num-examples"}
            low = {"loss": 0.0, "kappa": -1.0}
            assert all(low.get(k, 0.0) <= v <= (10.0 if k == "loss" else 1.0) for k, v in others.items()), others
            assert not set(_numbers(list(others.values()))) & person_ids
    # rounds 2 and 3 evaluate the weights they received (the global model of rounds 1 and 2)
    assert with_evaluation == 2 * len(SITES)
    assert manifest["bytes"]["sent"] > 3 * len(SITES) * manifest["bytes"]["model"]
    assert all(r["bytes_sent"] >= len(SITES) * manifest["bytes"]["model"] for r in rounds)


def test_fedprox_needs_a_fedprox_study(federation) -> None:
    """A coordinator cannot turn the approved FedAvg study into FedProx (the sites refuse the proximal term
    they did not approve); a study that says FedProx is prepared, approved and trains with it."""
    from omopfl import audit
    from omopfl.config import load_site
    from omopfl.errors import FederationError
    from omopfl.federation.site.audit_trail import audit_path
    from omopfl.study import load_study

    with pytest.raises(FederationError, match="min-sites"):
        run_training(federation["study"], federation["adapters"], federation["prepared_dir"],
                     out_dir=federation["tmp"] / "run_override", rounds=1, strategy="fedprox", proximal_mu=0.1)
    last = audit.read(audit_path(load_site(federation["adapters"][0])))[-1]
    assert (last["message_type"], last["outcome"], last["code"]) == ("train", "refused", "settings_mismatch")

    variant = federation["tmp"] / "study_fedprox.toml"
    variant.write_text(federation["study"].read_text().replace('strategy = "fedavg"',
                                                                'strategy = "fedprox"\nproximal_mu = 0.1'))
    spec = load_study(variant)
    prepared = federation["tmp"] / "prepared_fedprox"
    prepare_and_approve(federation["adapters"], spec, prepared)
    run_dir = federation["tmp"] / "run_fedprox"
    manifest = run_training(variant, federation["adapters"], prepared, out_dir=run_dir, rounds=1)
    assert manifest["training"]["strategy"] == "fedprox" and manifest["training"]["proximal_mu"] == 0.1
    assert manifest["final"]["eval_auc"] is not None and manifest["final"]["train_n"] > 0
    assert (run_dir / "model.npz").is_file()


def test_fedadam_inprocess_differs_from_fedavg(federation) -> None:
    """FedAdam (server-side Adam on the averaged update) really replaces FedAvg: with the same seeds and
    rounds, the two runs end with different weights, and both evaluate."""
    import numpy as np

    runs = {}
    for strategy in ("fedavg", "fedadam"):
        run_dir = federation["tmp"] / f"run_cmp_{strategy}"
        manifest = run_training(federation["study"], federation["adapters"], federation["prepared_dir"],
                                out_dir=run_dir, rounds=2, strategy=strategy)
        assert manifest["training"]["strategy"] == strategy
        assert manifest["final"]["round"] == 2 and manifest["final"]["train_n"] > 0
        with np.load(run_dir / "model.npz") as trained:
            runs[strategy] = [trained[k] for k in trained.files]
    assert any(not np.allclose(a, b) for a, b in zip(runs["fedavg"], runs["fedadam"], strict=True))


def test_site_failure_leaves_only_a_fixed_code(federation, tmp_path: Path) -> None:
    """Without a global scaler the site refuses to train; the error text is a fixed code only."""
    import shutil

    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

    from omopfl.federation import codec
    from omopfl.models import build_model
    from omopfl.study import load_study

    shutil.copytree(federation["prepared_dir"] / "site_a", tmp_path / "site_a")
    (tmp_path / "site_a" / "scaler.json").unlink(missing_ok=True)
    prepared = load_prepared(tmp_path / "site_a")
    model = build_model(load_study(federation["study"]).model, len(prepared.feature_names))
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "config": ConfigRecord({"server-round": 1, "study-hash": federation["study_hash"]})})
    context = Context(run_id=7, node_id=42, node_config={"site-config": str(federation["adapters"][0]),
                                                          "prepared-dir": str(tmp_path)},
                      state=RecordDict(), run_config={})
    reply = serve_at_site(content, context, "train", run_id=7, message_id="m1",
                          node_id=1)
    assert codec.reply_refusal(reply.content) == ("site_a", "not_prepared")
    assert codec.to_plain(reply.content) == {"omopfl.site": {"protocol": 1, "site": "site_a", "status": "error",
                                                             "code": "not_prepared"}}


@pytest.mark.slow
def test_fedavg_deployment_on_loopback(federation) -> None:
    """The same training through real Flower processes (SuperLink + 3 SuperNodes, ``flwr run``)."""
    run_dir = federation["tmp"] / "run_deployment"
    manifest = run_training(federation["study"], federation["adapters"], federation["prepared_dir"],
                            mode="deployment", out_dir=run_dir, rounds=2, audit=True, timeout=400)
    print(json.dumps({"seconds": manifest["seconds"], "runner": manifest["runner"], "final": manifest["final"]}))
    assert manifest["runner"]["engine"].startswith("deployment")
    assert manifest["sites"] == list(SITES)
    assert manifest["final"]["eval_auc"] is not None and manifest["final"]["eval_auc"] > 0.6
    replies = json.loads((run_dir / "audit.json").read_text())["replies"]
    kinds = [r["message_type"] for r in replies]
    assert all("content" in r for r in replies)
    assert kinds.count("train") == 2 * len(SITES) and kinds.count("evaluate") == len(SITES)


def test_cli_train_simulate_writes_model_metrics_plot_and_report(federation, capsys) -> None:

    run_dir = federation["tmp"] / "cli_run"
    args = ["train", "--simulate", "--study", str(federation["study"]), "--prepared", str(federation["prepared_dir"]),
            "--out", str(run_dir), "--rounds", "2", "--json"]
    for adapter in federation["adapters"]:
        args += ["--site", str(adapter)]
    code = run_omopfl(args)
    assert code == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["training"]["rounds"] == 2
    for name in ("model.npz", "metrics.json", "metrics.csv", "metrics.png", "report.md", "manifest.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (run_dir / "report.md").read_text()
    assert "| auc |" in report and "| 2 |" in report


def test_cli_train_needs_a_mode(capsys) -> None:
    from omopfl.cli import main

    with pytest.raises(SystemExit) as info:
        main(["train"])
    assert info.value.code == 2
    assert "--simulate" in capsys.readouterr().err


def test_cli_server_resume_needs_a_checkpoint_and_tls_or_insecure(tmp_path: Path, capsys) -> None:
    """Both refusals come before any process starts, as one line naming what to do."""
    from omopfl.cli import main

    study = ROOT / "examples" / "t2dm_hf" / "study.toml"
    for args, expected in (
        (["server", "--study", str(study), "--out", str(tmp_path / "run"), "--insecure", "--resume"],
         "checkpoint.json not found"),
        (["server", "--study", str(study), "--out", str(tmp_path / "run")], "--insecure (loopback and testing only)"),
        (["train", "--site", str(ROOT / "adapters" / "site_a.toml"), "--superlink", "127.0.0.1:9"],
         "--root-certificates CA.pem (TLS) or --insecure"),
    ):
        with pytest.raises(SystemExit) as info:
            main(args)
        err = capsys.readouterr().err
        assert info.value.code == 2 and expected in err and err.count("\n") == 1, err
