"""What people would rather look at: PNG plots of a run's per-round metrics and a short markdown report.

Reads only the run directory (``metrics.json``, ``manifest.json``, ``stats.json``): aggregates and
model metadata, never patient data.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["plot_metrics", "write_report"]

_PANELS: tuple[tuple[str, str], ...] = (
    ("eval_auc", "AUC (federated evaluation)"),
    ("eval_loss", "evaluation loss"),
    ("train_loss", "training loss"),
    ("eval_accuracy", "accuracy"),
    ("eval_f1", "F1"),
    ("eval_kappa", "Cohen's kappa"),
)


def _series(rounds: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for row in rounds:
        value = row.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            xs.append(int(row["round"]))
            ys.append(float(value))
    return xs, ys


def plot_metrics(run_dir: str | Path) -> Path:
    """Write ``metrics.png`` (one panel per metric over rounds) into the run directory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5), constrained_layout=True)
    for ax, (key, title) in zip(axes.flat, _PANELS, strict=True):
        xs, ys = _series(rounds, key)
        ax.plot(xs, ys, marker="o", color="#1f6f8b")
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        if xs:
            ax.set_xticks(xs)
    manifest = _read(run_dir / "manifest.json")
    fig.suptitle(f"omopfl run: {manifest.get('study_name', run_dir.name)}")
    out = run_dir / "metrics.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


NO_EVALUATION = ("no federated evaluation was released: no site's test set passed its release rule (every "
                 "confusion-matrix cell at the study's threshold must hold at least the site's min_cell_count "
                 "persons); a larger test set ([split] or [training] test_fraction) or another [training] threshold "
                 "may release it")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.3f}"
    return "n/a" if value is None else str(value)


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md``: what was trained on what, the final metrics, and the files of the run."""
    run_dir = Path(run_dir)
    manifest = _read(run_dir / "manifest.json")
    rounds = _read(run_dir / "metrics.json").get("rounds", [])
    stats = _read(run_dir / "stats.json")
    last = rounds[-1] if rounds else {}
    study_name = manifest.get("study_name")
    sites = stats.get("sites", {})
    lines = [
        f"# omopfl run: {study_name or run_dir.name}",
        "",
        f"- model: {json.dumps(manifest.get('model', {}))}",
        f"- training: {json.dumps(manifest.get('training', {}))}",
        f"- sites contributing to the statistics: {', '.join(sites.get('contributing', [])) or 'n/a'}",
        f"- sites that withheld all their statistics (fewer persons than their min_cell_count): "
        f"{', '.join(sites.get('withheld', [])) or 'none'}",
        f"- rounds: {len(rounds)}",
        "",
    ]
    suppressed = sites.get("suppressed") or {}
    if suppressed:
        lines += ["## Features withheld by a site's release rule (statistics phase)", "",
                  "The merged statistics of these features come from the other sites only.", "",
                  "| site | withheld features |", "|---|---|"]
        lines += [f"| {site} | {', '.join(names)} |" for site, names in sorted(suppressed.items())]
        lines.append("")
    lines += [
        "## Final federated evaluation (n-weighted over sites)",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    if last.get("eval_auc") is None and not last.get("eval_n"):
        lines[-4:] = ["## Final federated evaluation", "", NO_EVALUATION + "."]
    else:
        for key in ("eval_auc", "eval_accuracy", "eval_f1", "eval_kappa", "eval_loss", "eval_n"):
            lines.append(f"| {key.removeprefix('eval_')} | {_fmt(last.get(key))} |")
    pooled = _read(run_dir / "pooled.json").get("metrics", {})
    if pooled:
        weighted = pooled.get("site_weighted", {})
        lines += ["", "## Federated beside the pooled baseline (same per-site test rows)", "",
                  "| metric | federated | pooled (site-weighted) |", "|---|---|---|"]
        for key in ("auc", "accuracy", "f1", "kappa", "loss"):
            lines.append(f"| {key} | {_fmt(last.get('eval_' + key))} | {_fmt(weighted.get(key))} |")
    privacy = manifest.get("privacy") or {}
    if privacy.get("epsilon_per_site"):
        per_round = privacy.get("epsilon_per_round", {})
        names = sorted(privacy["epsilon_per_site"])
        lines += ["", "## Privacy: epsilon spent per site (DP-SGD)", "",
                  "Each site's own count of the epsilon it has spent on this study in all (statistics and "
                  "DP-SGD rounds, basic composition; its budget ledger), as it reported it with its train replies.",
                  "", "| site | epsilon |", "|---|---|"]
        lines += [f"| {name} | {privacy['epsilon_per_site'][name]:.4f} |" for name in names]
        if per_round:
            lines += ["", "| round | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
            for key in sorted(per_round, key=int):
                lines.append(f"| {key} | " + " | ".join(_fmt(per_round[key].get(name)) for name in names) + " |")
    dropped = manifest.get("dropped") or []
    if dropped or manifest.get("resumed_from_round"):
        lines += ["", "## Faults", ""]
        for d in dropped:
            statistics = d.get("phase") == "statistics"
            when = "left in the statistics phase" if statistics else f"dropped in round {d['round']}"
            lines.append(f"- site {d['site']} {when}: {d['reason']}")
        if manifest.get("resumed_from_round"):
            lines.append(f"- resumed from the checkpoint of round {manifest['resumed_from_round']}")
    lines += ["", "## Per round", "", "| round | train loss | eval loss | AUC | accuracy | F1 | kappa |",
              "|---|---|---|---|---|---|---|"]
    for row in rounds:
        lines.append("| " + " | ".join(_fmt(row.get(k)) for k in (
            "round", "train_loss", "eval_loss", "eval_auc", "eval_accuracy", "eval_f1", "eval_kappa")) + " |")
    lines += ["", "![metrics](metrics.png)", "", "## Files", ""]
    lines += [f"- `{name}` sha256 `{digest[:16]}…`" for name, digest in sorted(manifest.get("files", {}).items())]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out
