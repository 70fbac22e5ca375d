"""DP-SGD through the real ServerApp/ClientApp path (in-process Flower): epsilon per site in the run's
manifest, metrics and report equals what each site counted itself (its budget ledger and audit log), and
a site whose budget is used refuses to train again (``budget_spent``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import prepare_and_approve

from omopfl import audit, budget, policy
from omopfl.config import load_site
from omopfl.errors import FederationError
from omopfl.federation.site.audit_trail import audit_path
from omopfl.study import load_study

SITES = ("site_a", "site_b", "site_c")
TARGET = 3.0
DELTA = 1e-6


def _dp_study(federation: dict[str, Any]) -> Path:
    text = federation["study"].read_text().replace("rounds = 5", "rounds = 2").replace("local_epochs = 2",
                                                                                      "local_epochs = 1")
    path = federation["tmp"] / "study_dpsgd.toml"
    path.write_text(text + f"\n[privacy]\ndp_sgd = true\ntarget_epsilon = {TARGET}\ndelta = {DELTA}\n"
                    f"max_grad_norm = 1.0\nbudget_epsilon = {TARGET}\n")
    return path


@pytest.fixture(scope="module")
def dpsgd(prepared_sites_factory) -> dict[str, Any]:

    federation = prepared_sites_factory("dpsgd", approve=False)
    study = _dp_study(federation)
    spec = load_study(study)
    prepared = federation["tmp"] / "prepared_dp"
    prepare_and_approve(federation["adapters"], spec, prepared)
    return {**federation, "dp_study": study, "dp_prepared": prepared, "dp_hash": spec.hash}


def _train_epsilons(site_name: str, adapter: Path) -> list[tuple[str, float | None]]:
    """(outcome or refusal code, epsilon in the reply's metrics) of every train reply in the site's audit log."""
    out = []
    for entry in audit.read(audit_path(load_site(adapter))):
        if entry["message_type"] != "train":
            continue
        metrics = next((r for r in entry["records"] if r["name"] == "metrics"), None)
        value = None if metrics is None else metrics["values"].get("epsilon")
        out.append((entry["code"] or entry["outcome"], value))
    return out


def test_dp_sgd_run_reports_each_sites_own_epsilon_and_stops_at_the_budget(dpsgd) -> None:
    from omopfl.federation.local import run_training
    from omopfl.report import write_report

    run_dir = dpsgd["tmp"] / "run_dp"
    manifest = run_training(dpsgd["dp_study"], dpsgd["adapters"], dpsgd["dp_prepared"], mode="inprocess",
                            out_dir=run_dir, audit=True)
    privacy = manifest["privacy"]
    assert sorted(privacy["epsilon_per_site"]) == list(SITES)
    assert json.loads((run_dir / "manifest.json").read_text())["privacy"] == privacy
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [sorted(r["epsilon"]) for r in rounds] == [list(SITES)] * 2
    for adapter, name in zip(dpsgd["adapters"], SITES, strict=True):
        site = load_site(adapter)
        ledger = budget.Ledger(policy.state_dir(site), dpsgd["dp_hash"], DELTA)
        spent = ledger.spent()
        # the whole study's target is spent over its rounds, and never more
        assert 0.9 * TARGET < spent <= TARGET + 1e-9, (name, spent)
        assert privacy["epsilon_per_site"][name] == pytest.approx(spent, abs=1e-6)
        # each round's figure is what the site's audit log shows it sent with that round's train reply
        logged = _train_epsilons(name, adapter)
        assert [code for code, _ in logged] == ["sent", "sent"]
        assert [rounds[i]["epsilon"][name] for i in range(2)] == [value for _, value in logged]
        assert rounds[0]["epsilon"][name] < rounds[1]["epsilon"][name]
    report = write_report(run_dir).read_text()
    assert "## Privacy: epsilon spent per site (DP-SGD)" in report
    for name in SITES:
        assert f"| {name} | {privacy['epsilon_per_site'][name]:.4f} |" in report

    # a second run of the same study: every site's budget is used, so each refuses to train
    with pytest.raises(FederationError, match=r"round 1: 0 site\(s\) replied, fewer than min-sites 3"):
        run_training(dpsgd["dp_study"], dpsgd["adapters"], dpsgd["dp_prepared"], mode="inprocess",
                     out_dir=dpsgd["tmp"] / "run_dp2", audit=True)
    for adapter, name in zip(dpsgd["adapters"], SITES, strict=True):
        logged = _train_epsilons(name, adapter)
        assert logged[-1] == ("budget_spent", None), (name, logged)
        site = load_site(adapter)
        assert budget.Ledger(policy.state_dir(site), dpsgd["dp_hash"], DELTA).spent() == pytest.approx(
            privacy["epsilon_per_site"][name], abs=1e-6)  # nothing more was charged
