"""External validation (issue 14): PLP-style measures under the release rule, and ``omopfl evaluate``.

* DeLong's AUC variance equals its definition computed pair by pair; the calibration slope of a model
  whose logits are doubled is 1/2;
* risk bins, the threshold table and the demographic summary: every released count, and every
  difference between two rows of the threshold table, is 0 or at least k, on many random data sets;
* ``omopfl evaluate`` applies a run trained at two sites to a third site that never trained: its
  risks equal scoring by hand (numpy) to float32 precision, its AUC equals scikit-learn's on those.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from omopfl import plp_metrics
from omopfl.release import small


def _data(seed: int, n: int = 400, prevalence: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logit = rng.normal(np.log(prevalence / (1 - prevalence)), 1.2, n)
    p = 1 / (1 + np.exp(-logit))
    return (rng.random(n) < p).astype(float), p


def test_delong_equals_its_pairwise_definition() -> None:
    y, p = _data(1, n=150)
    p = np.round(p, 2)  # ties between and within classes
    auc, low, high = plp_metrics.auc_delong(y, p)
    pos, neg = p[y == 1], p[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    se = math.sqrt(v10.var(ddof=1) / pos.size + v01.var(ddof=1) / neg.size)
    assert auc == pytest.approx(roc_auc_score(y, p), abs=1e-12) == pytest.approx(psi.mean(), abs=1e-12)
    assert low == pytest.approx(auc - 1.959963984540054 * se, abs=1e-9)
    assert high == pytest.approx(auc + 1.959963984540054 * se, abs=1e-9)
    assert all(math.isnan(v) for v in plp_metrics.auc_delong([0, 0, 0], [0.1, 0.2, 0.3]))


def test_calibration_slope_of_an_overconfident_model_is_one_half() -> None:
    rng = np.random.default_rng(7)
    logit = rng.normal(-1, 1.5, 20000)
    y = (rng.random(logit.size) < 1 / (1 + np.exp(-logit))).astype(float)
    slope, intercept = plp_metrics.calibration_line(y, 1 / (1 + np.exp(-logit)))
    assert slope == pytest.approx(1.0, abs=0.06) and intercept == pytest.approx(0.0, abs=0.06)
    slope, _ = plp_metrics.calibration_line(y, 1 / (1 + np.exp(-2 * logit)))
    assert slope == pytest.approx(0.5, abs=0.04)


@pytest.mark.parametrize("seed", range(25))
def test_every_released_count_and_difference_obeys_the_rule(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 12))
    y, p = _data(seed, n=int(rng.integers(30, 500)), prevalence=float(rng.uniform(0.03, 0.5)))
    p = np.round(p, int(rng.integers(1, 4)))
    bins = plp_metrics.risk_bins(y, p, k)
    if bins:
        assert sum(b["n"] for b in bins) == y.size and sum(b["outcomes"] for b in bins) == y.sum()
    for b in bins:
        assert not small(b["outcomes"], k) and not small(b["n"] - b["outcomes"], k), (k, b)
    table = plp_metrics.threshold_table(bins)
    for j, row in enumerate(table):
        t = bins[j]["low"]
        assert (row["tp"], row["fp"]) == (int(((p >= t) & (y == 1)).sum()), int(((p >= t) & (y == 0)).sum())), t
        assert j == 0 or bins[j - 1]["high"] < row["threshold"] < t or row["threshold"] == round(t, 4)
    for a, b in itertools.combinations(table, 2):
        for cell in ("tp", "fp", "fn", "tn"):
            assert not small(abs(a[cell] - b[cell]), k), (k, cell, a, b)
    ages = rng.uniform(10, 95, y.size)
    sexes = rng.choice(["male", "female", "unknown"], y.size, p=[0.49, 0.49, 0.02]).tolist()
    summary = plp_metrics.demographic_summary(y, p, k, age=ages, sex=sexes)
    for rows in summary.values():
        for r in rows:
            assert not (small(r["n"], k) or small(r["outcomes"], k) or small(r["n"] - r["outcomes"], k)), (k, r)
        if small(y.sum(), k) or small(y.size - y.sum(), k):
            assert rows == []  # everything pooled: 'other' is the whole (small) total, not released
            continue
        withheld = y.size - sum(r["n"] for r in rows)
        withheld_outcomes = int(y.sum()) - sum(r["outcomes"] for r in rows)
        assert not small(withheld, k) and not small(withheld_outcomes, k), (k, rows)


def test_a_small_demographic_group_is_pooled_into_other() -> None:
    y = np.array([1, 0] * 20 + [1, 1, 0, 0])  # 40 persons aged 50, 4 aged 90
    p = np.linspace(0.1, 0.9, y.size)
    ages = np.array([50.0] * 40 + [90.0] * 4)
    rows = plp_metrics.demographic_summary(y, p, 5, age=ages)["age_group"]
    # 85+ (4 persons) is small; 'other' would hold just those 4, so 45-64 joins it
    assert [(r["group"], r["n"], r["outcomes"]) for r in rows] == [("other", 44, 22)]
    rows = plp_metrics.demographic_summary(y, p, 2, age=ages)["age_group"]
    assert [(r["group"], r["n"], r["outcomes"]) for r in rows] == [("45-64", 40, 20), ("85+", 4, 2)]


def test_performance_matches_scikit_learn_and_is_withheld_below_k() -> None:
    y, p = _data(3)
    result = plp_metrics.performance(y, p, 10)
    assert result["auc"] == round(roc_auc_score(y, p), 4)
    assert result["auprc"] == round(average_precision_score(y, p), 4)
    assert result["brier"] == round(brier_score_loss(y, p), 4)
    assert result["auc_ci95"][0] < result["auc"] < result["auc_ci95"][1]
    few = plp_metrics.performance(y[:40] * 0 + np.r_[np.ones(3), np.zeros(37)], p[:40], 10)
    assert few == {"withheld": True, "reason": few["reason"]} and "min_cell_count" in few["reason"]


def test_evaluate_applies_a_run_to_a_site_that_never_trained(prepared_sites_factory, capsys) -> None:
    from omopfl.federation.local import run_training
    from omopfl.prepare import load_prepared

    fed = prepared_sites_factory("external")
    run_dir = fed["tmp"] / "run"
    run_training(fed["study"], fed["adapters"][:2], fed["prepared_dir"], out_dir=run_dir, rounds=2, min_sites=2)
    out = fed["tmp"] / "validation_c"
    code, _, err = run_cli(["evaluate", "--run", run_dir, "--site", fed["adapters"][2], "--prepared",
                            fed["prepared_dir"], "--out", out], capsys)
    assert code == 0, err
    result = json.loads((out / "validation.json").read_text())
    assert {p.name for p in out.iterdir()} == {"validation.json", "validation.md", "roc.png", "calibration.png"}

    # scoring by hand: impute with the global means, standardize, the logistic model's weights
    scaler = json.loads((run_dir / "scaler.json").read_text())
    weights = np.load(run_dir / "model.npz")
    site_c = load_prepared(fed["prepared_dir"] / "site_c")
    x = np.asarray(site_c.x, dtype=np.float64)
    mean, scale = np.asarray(scaler["mean"]), np.asarray(scaler["scale"])
    z = (np.where(np.isnan(x), mean, x) - mean) / scale
    by_hand = 1 / (1 + np.exp(-(z @ weights["linear.weight"].reshape(-1).astype(np.float64)
                                + float(weights["linear.bias"][0]))))

    from omopfl.external_validation import load_run, score_site

    scored = score_site(load_run(run_dir), site_c, "all")
    np.testing.assert_allclose(scored["p"], by_hand, rtol=1e-5, atol=1e-6)
    assert result["site"] == "site_c" and result["rows"] == "all" and result["min_cell_count"] == 2
    assert result["n"] == x.shape[0] and result["outcomes"] == int(site_c.y.sum())
    assert result["auc"] == pytest.approx(roc_auc_score(site_c.y, by_hand), abs=1e-4)
    assert "External validation at site_c" in (out / "validation.md").read_text()


def test_evaluate_names_what_is_wrong(prepared_sites_factory, tmp_path: Path, capsys) -> None:
    fed = prepared_sites_factory("external_bad", approve=False)
    code, _, err = run_cli(["evaluate", "--run", tmp_path, "--site", fed["adapters"][0], "--prepared",
                            fed["prepared_dir"]], capsys)
    assert code == 5 and len(err) == 1 and "no manifest.json" in err[0] and "finished omopfl train run" in err[0]
