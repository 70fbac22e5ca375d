"""DP noise on released evaluation metrics (``[privacy] metrics_epsilon``, issue 12).

The noise is calibrated (many draws have the discrete Laplace's spread); a site releases metrics computed
from noisy confusion-matrix cells only (no AUC, no loss), each release charged to the study's ledger and
shown in the audit log, refused once the budget is spent; every released evaluation still implies cells of
at least k; a site whose policy requires DP refuses a study without metrics DP.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

import numpy as np
import pytest
from conftest import prepare_and_approve, serve_at_site
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from omopfl import audit, budget, dp_metrics, policy
from omopfl.config import load_site
from omopfl.federation import codec
from omopfl.federation.site import audit_trail
from omopfl.study import load_study

EPSILON, BUDGET = 0.5, 2.0


def test_discrete_laplace_noise_has_the_calibrated_spread() -> None:
    rng = np.random.default_rng(1)
    for epsilon in (0.2, 1.0, 3.0):
        z = dp_metrics.discrete_laplace(epsilon, 200_000, rng)
        q = math.exp(-epsilon)
        variance = 2 * q / (1 - q) ** 2
        assert z.dtype == np.int64 and abs(z.mean()) < 5 * math.sqrt(variance / z.size)
        assert z.var() == pytest.approx(variance, rel=0.05)
        assert np.mean(z == 0) == pytest.approx((1 - q) / (1 + q), abs=0.01)
    with pytest.raises(ValueError, match="epsilon"):
        dp_metrics.discrete_laplace(0.0, 1)


def test_noisy_evaluation_follows_the_release_rule_on_the_noisy_cells() -> None:
    rng = np.random.default_rng(2)
    k = 10
    y = np.array([1] * 30 + [0] * 70)
    prob = np.array([0.9] * 18 + [0.1] * 12 + [0.9] * 12 + [0.1] * 58)  # TP 18, FN 12, FP 12, TN 58
    released, accuracies = 0, []
    for _ in range(2000):
        result, drawn, cells = dp_metrics.noisy_evaluation(y, prob, k, 0.5, 1.0, rng)
        assert drawn
        if result is None:
            assert min(cells) < k
            continue
        released += 1
        assert min(cells) >= k and result["n"] == sum(cells) >= 4 * k
        assert set(result) == {"n", "accuracy", "f1", "kappa"}  # no auc, no loss
        exact = dp_metrics.metrics_from_cells(cells)
        assert all(abs(result[key] - exact[key]) <= 5e-5 for key in dp_metrics.NOISY_METRICS)
        accuracies.append(result["accuracy"])
    assert released > 1500 and np.std(accuracies) > 0.005  # noise present
    assert np.mean(accuracies) == pytest.approx(0.76, abs=0.01)
    # a true cell below k: withheld, no noise drawn, nothing to charge
    result, drawn, _ = dp_metrics.noisy_evaluation(y, np.where(np.arange(100) < 5, 0.9, 0.1), k, 0.5, 1.0, rng)
    assert result is None and not drawn


@pytest.fixture(scope="module")
def private(prepared_sites_factory) -> dict[str, Any]:

    federation = prepared_sites_factory("dp_metrics")
    study = federation["tmp"] / "study_dp_metrics.toml"
    # a per-person hash split: the test rows (and so the true cells the release rule sees) do not depend on
    # the order in which the database returns the cohort
    study.write_text(federation["study"].read_text().replace("test_fraction = 0.25\n", "")
                     + f"\n[privacy]\nmetrics_epsilon = {EPSILON}\nbudget_epsilon = {BUDGET}\n"
                     + '\n[split]\nmethod = "hash"\ntest_fraction = 0.3\nseed = 5\n')
    spec = load_study(study)
    assert spec.privacy.metrics_epsilon == EPSILON
    prepared = federation["tmp"] / "prepared_dp_metrics"
    prepare_and_approve(federation["adapters"], spec, prepared)
    return {**federation, "dp_study": study, "dp_prepared": prepared, "dp_hash": spec.hash}


def _evaluate(private: dict[str, Any], arrays: ArrayRecord, run_id: int) -> RecordDict:
    context = Context(run_id=run_id, node_id=1, state=RecordDict(), run_config={},
                      node_config={"site-config": str(private["adapters"][0]),
                                   "prepared-dir": str(private["dp_prepared"])})
    content = RecordDict({codec.TRAIN_CONFIG: ConfigRecord({codec.STUDY_HASH_KEY: private["dp_hash"],
                                                            "server-round": 1}),
                          codec.TRAIN_ARRAYS: arrays})
    return serve_at_site(content, context, "evaluate", run_id=run_id, message_id=f"e{run_id}",
                          node_id=1).content


def test_a_site_releases_noisy_metrics_charges_its_budget_and_then_refuses(private) -> None:
    from omopfl.federation.local import run_training

    run_dir = private["tmp"] / "run_dp_metrics"
    run_training(private["dp_study"], private["adapters"], private["dp_prepared"], mode="inprocess",
                 out_dir=run_dir, rounds=2)
    rows = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    # the noisy cells may fall below k in one round (then that round's evaluation is withheld): some round
    # releases noisy accuracy, and no round ever releases AUC (not released under DP)
    assert any(r["eval_accuracy"] is not None for r in rows) and all(r["eval_auc"] is None for r in rows)
    with np.load(io.BytesIO((run_dir / "model.npz").read_bytes())) as saved:
        arrays = ArrayRecord({k: Array(saved[k]) for k in saved.files})
    site = load_site(private["adapters"][0])
    ledger = budget.Ledger(policy.state_dir(site), private["dp_hash"], 1e-6)
    spent = ledger.spent()
    assert spent > 0 and ledger.read()["metrics"] == [EPSILON] * round(spent / EPSILON)
    left = round((BUDGET - spent) / EPSILON)
    assert left >= 1
    releases = []
    for i in range(left + 1):
        reply = _evaluate(private, arrays, 8800 + i)
        refusal = codec.reply_refusal(reply)
        if i < left:
            assert refusal is None
            releases.append(dict(reply.metric_records[codec.TRAIN_METRICS]))
        else:
            assert refusal is not None and refusal[1] == "budget_spent"
    assert ledger.spent() == pytest.approx(BUDGET)
    for metrics in releases:
        assert "auc" not in metrics and "loss" not in metrics
        assert metrics["num-examples"] == 0 or metrics["num-examples"] >= 4 * site.min_cell_count
    # the same model and rows twice: the noise makes the releases differ (with probability > 0.99 here)
    if len(releases) >= 2 and all(m["num-examples"] for m in releases[:2]):
        assert releases[0] != releases[1]
    entries = [e for e in audit.read(audit_trail.audit_path(site)) if e["message_type"] == "evaluate"
               and 8800 <= e["run_id"] <= 8800 + left]
    assert [e.get("privacy", {}).get("epsilon") for e in entries] == [EPSILON] * left + [None]
    assert entries[-1]["code"] == "budget_spent"
    assert entries[left - 1]["privacy"]["epsilon_total"] == pytest.approx(BUDGET)


def test_a_site_that_requires_dp_requires_it_on_metrics(private) -> None:
    adapter = private["tmp"] / "site_a_dp_required.toml"
    adapter.write_text(private["adapters"][0].read_text() + "\n[policy]\ndp_required = true\nepsilon_budget = 4.0\n")
    problems = policy.policy_problems(load_study(private["study"]), load_site(adapter))
    assert any("metrics_epsilon" in p for p in problems)
    problems = policy.policy_problems(load_study(private["dp_study"]), load_site(adapter))
    assert not any("metrics_epsilon" in p for p in problems)
