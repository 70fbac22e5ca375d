"""Federated against centralized training over repeated runs: the test, the difference, the plot.

Given one metric (AUC) from ``N`` repeats of federated and of pooled (centralized) training, this
reports what the DICOM federated-learning papers report: the Wilcoxon rank-sum test of the two
distributions (SciPy's :func:`scipy.stats.ranksums`, two-sided), the mean difference
(federated - pooled) with its 95% confidence interval, and a box plot. When the repeats are paired
(repeat ``r`` of both used the same synthetic sites and seed) the interval is the t-interval of the
paired differences, else Welch's; the Wilcoxon signed-rank p-value of the paired differences is
given beside it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["compare_runs", "box_plot"]


def _finite(values: Sequence[float | None]) -> np.ndarray:
    return np.asarray([float(v) for v in values if v is not None and math.isfinite(float(v))], dtype=np.float64)


def _r(value: float) -> float | None:
    return round(float(value), 6) if math.isfinite(float(value)) else None


def compare_runs(federated: Sequence[float | None], pooled: Sequence[float | None], *,
                 paired: bool = True, level: float = 0.95) -> dict[str, Any]:
    """The comparison of two lists of one metric (``None``/NaN entries are left out; with ``paired``
    a repeat is left out of both when either misses it)."""
    from scipy import stats

    if paired:
        if len(federated) != len(pooled):
            raise ValueError("paired repeats need as many federated as pooled values")
        keep = [i for i, (a, b) in enumerate(zip(federated, pooled, strict=True))
                if a is not None and b is not None and math.isfinite(float(a)) and math.isfinite(float(b))]
        fed, cen = _finite([federated[i] for i in keep]), _finite([pooled[i] for i in keep])
    else:
        fed, cen = _finite(federated), _finite(pooled)
    out: dict[str, Any] = {"repeats": {"federated": int(fed.size), "pooled": int(cen.size)}, "paired": paired,
                           "federated": {"mean": None, "std": None, "median": None},
                           "pooled": {"mean": None, "std": None, "median": None},
                           "wilcoxon_rank_sum_p": None, "wilcoxon_signed_rank_p": None,
                           "mean_difference": None, "difference_ci95": [None, None]}
    for name, values in (("federated", fed), ("pooled", cen)):
        if values.size:
            out[name] = {"mean": _r(values.mean()), "std": _r(values.std(ddof=1)) if values.size > 1 else None,
                         "median": _r(float(np.median(values)))}
    if fed.size < 2 or cen.size < 2:
        return out
    out["wilcoxon_rank_sum_p"] = _r(stats.ranksums(fed, cen).pvalue)
    if paired:
        diff = fed - cen
        out["mean_difference"] = _r(diff.mean())
        if np.any(diff != 0):
            out["wilcoxon_signed_rank_p"] = _r(stats.wilcoxon(diff).pvalue)
        half = stats.t.ppf(0.5 + level / 2, diff.size - 1) * diff.std(ddof=1) / math.sqrt(diff.size)
    else:
        out["mean_difference"] = _r(fed.mean() - cen.mean())
        va, vb = fed.var(ddof=1) / fed.size, cen.var(ddof=1) / cen.size
        dof = (va + vb) ** 2 / (va**2 / (fed.size - 1) + vb**2 / (cen.size - 1)) if va + vb > 0 else 1.0
        half = stats.t.ppf(0.5 + level / 2, dof) * math.sqrt(va + vb)
    out["difference_ci95"] = [_r(out["mean_difference"] - half), _r(out["mean_difference"] + half)]
    return out


def box_plot(groups: dict[str, tuple[Sequence[float | None], Sequence[float | None]]], path: str | Path, *,
             metric: str = "AUC", title: str = "federated vs pooled over repeated runs") -> Path:
    """One pair of boxes (federated, pooled) per group (e.g. per site count), written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(groups), 4.2), constrained_layout=True)
    data, labels, colours = [], [], []
    for name, (fed, cen) in groups.items():
        data += [_finite(fed), _finite(cen)]
        labels += [f"{name}\nfederated", f"{name}\npooled"]
        colours += ["#1f6f8b", "#8b1f4f"]
    boxes = ax.boxplot(data, patch_artist=True, tick_labels=labels)
    for patch, colour in zip(boxes["boxes"], colours, strict=True):
        patch.set_facecolor(colour)
        patch.set_alpha(0.35)
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
