"""Repeated-run comparison of federated and pooled training (omopfl.run_comparison)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from omopfl.run_comparison import box_plot, compare_runs


def test_the_test_and_the_interval_are_scipys() -> None:
    rng = np.random.default_rng(3)
    pooled = rng.normal(0.80, 0.01, 10)
    federated = pooled - 0.02 + rng.normal(0, 0.004, 10)
    out = compare_runs(federated.tolist(), pooled.tolist())
    assert out["wilcoxon_rank_sum_p"] == pytest.approx(stats.ranksums(federated, pooled).pvalue, abs=1e-6)
    assert out["wilcoxon_rank_sum_p"] < 0.05  # a 0.02 drop over 10 repeats is detected
    diff = federated - pooled
    half = stats.t.ppf(0.975, 9) * diff.std(ddof=1) / math.sqrt(10)
    assert out["mean_difference"] == pytest.approx(diff.mean(), abs=1e-6)
    assert out["difference_ci95"] == pytest.approx([diff.mean() - half, diff.mean() + half], abs=1e-6)
    assert out["difference_ci95"][1] < 0


def test_equal_distributions_are_not_called_different() -> None:
    rng = np.random.default_rng(5)
    a, b = rng.normal(0.8, 0.01, 10), rng.normal(0.8, 0.01, 10)
    out = compare_runs(a.tolist(), b.tolist(), paired=False)
    assert out["wilcoxon_rank_sum_p"] > 0.05 and out["difference_ci95"][0] < 0 < out["difference_ci95"][1]


def test_missing_repeats_are_left_out_of_both_when_paired(tmp_path: Path) -> None:
    out = compare_runs([0.8, None, 0.79, float("nan"), 0.81], [0.82, 0.8, 0.8, 0.81, 0.8])
    assert out["repeats"] == {"federated": 3, "pooled": 3}
    assert compare_runs([0.8], [0.81])["wilcoxon_rank_sum_p"] is None  # one repeat: no test
    with pytest.raises(ValueError, match="paired"):
        compare_runs([0.8, 0.7], [0.8])
    path = box_plot({"3 sites": ([0.8, 0.81, 0.79], [0.82, 0.8, 0.81])}, tmp_path / "box.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
