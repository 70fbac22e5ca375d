"""Apply a trained run to a site's prepared data, at the site (PatientLevelPrediction's external validation).

``omopfl evaluate --run RUN_DIR --site ADAPTER`` loads what a run directory holds (``model.npz``,
``scaler.json``, ``features.json``, the model description in ``manifest.json``), scores the site's
prepared dataset with it and writes the site's validation result: ``validation.json`` (the
PLP-style measures of :mod:`omopfl.plp_metrics`, under the site's release rule), ``roc.png`` and
``calibration.png`` (drawn from the released tables only) and ``validation.md``. Per-person risks
never leave this module's caller: :func:`score_site` returns them for the site's own use.

Rows: ``all`` (a site that never trained: every person of its cohort) or ``test`` (the study's test
split at a site that trained: the rows its federated evaluation used).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from omopfl.errors import ConfigError, DataError

__all__ = ["ROWS", "TrainedRun", "load_run", "score_site", "validate_site", "write_validation",
           "write_validation_report"]

ROWS = ("all", "test")


@dataclass
class TrainedRun:
    """What a run directory holds for scoring new data."""

    run_dir: Path
    manifest: dict[str, Any]
    scaler: Any  # codec.GlobalScaler
    state: dict[str, np.ndarray]

    @property
    def feature_names(self) -> list[str]:
        return list(self.scaler.scaler.feature_names)

    def model(self) -> Any:
        """The trained torch model (eval mode)."""
        import torch

        from omopfl.models import build_model
        from omopfl.study import ModelSpec

        described = self.manifest.get("model", {})
        spec = ModelSpec(kind=str(described.get("kind", "logistic")),
                         hidden=tuple(int(h) for h in described.get("hidden", ())) or ModelSpec().hidden,
                         dropout=tuple(float(d) for d in described.get("dropout", (0.0, 0.0))))
        model = build_model(spec, len(self.feature_names), int(described.get("n_genes", 0)),
                            int(described.get("image_size", 0)))
        try:
            model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in self.state.items()})
        except (RuntimeError, KeyError):
            raise DataError(f"{self.run_dir / 'model.npz'}: the weights do not fit the run's model "
                            f"({spec.kind}); the run directory is damaged") from None
        model.eval()
        return model


def load_run(run_dir: str | Path) -> TrainedRun:
    """Read a finished run directory (:class:`DataError` naming the file when something is missing)."""
    from omopfl.federation import codec

    run_dir = Path(run_dir)
    for name in ("manifest.json", "scaler.json", "model.npz"):
        if not (run_dir / name).is_file():
            raise DataError(f"{run_dir}: no {name}; pass the folder of a finished omopfl train run")
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text())
        scaler = codec.GlobalScaler.from_dict(json.loads((run_dir / "scaler.json").read_text()))
        with np.load(run_dir / "model.npz", allow_pickle=False) as data:
            state = {k: np.array(data[k]) for k in data.files}
    except (OSError, ValueError, UnicodeDecodeError, codec.CodecError):
        raise DataError(f"{run_dir}: manifest.json, scaler.json or model.npz is unreadable; "
                        "the run directory is damaged") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{run_dir / 'manifest.json'}: not a run manifest")
    return TrainedRun(run_dir, manifest, scaler, state)


def _rows(run: TrainedRun, prepared: Any, rows: str) -> np.ndarray:
    from omopfl.models import split

    n = int(np.asarray(prepared.y).shape[0])
    if rows == "all":
        return np.arange(n)
    mask = getattr(prepared, "test_mask", None)
    if mask is not None:  # the study's fixed test set ([split]), prepared at the site
        return np.flatnonzero(np.asarray(mask, dtype=bool))
    training = run.manifest.get("training", {})
    _, test = split(n, float(training.get("test_fraction", 0.25)), int(training.get("seed", 0)), prepared.y)
    return np.asarray(test)


def _sex(prepared: Any, rows: np.ndarray) -> list[str] | None:
    names = [str(n) for n in prepared.feature_names]
    columns = [j for j, n in enumerate(names) if n.startswith("sex_") and not n.endswith("__missing")]
    if not columns:
        return None
    x = np.asarray(prepared.x, dtype=np.float64)[rows][:, columns]
    labels = []
    for row in x:
        ones = np.flatnonzero(np.nan_to_num(row) >= 0.5)
        labels.append(names[columns[ones[0]]].removeprefix("sex_") if ones.size == 1 else "unknown")
    return labels


def score_site(run: TrainedRun, prepared: Any, rows: str = "all") -> dict[str, Any]:
    """Labels, predicted risks, ages and sexes of the chosen rows (site-local: never send these)."""
    from omopfl.models import SiteTensors, predict_proba

    if rows not in ROWS:
        raise ConfigError(f"--rows must be one of {', '.join(ROWS)}, not {rows!r}")
    names = [str(n) for n in prepared.feature_names]
    if names != run.feature_names:
        missing = sorted(set(run.feature_names) - set(names))
        extra = sorted(set(names) - set(run.feature_names))
        detail = (f"missing {', '.join(missing[:5])}" if missing else "") + \
                 ("; " if missing and extra else "") + (f"extra {', '.join(extra[:5])}" if extra else "")
        raise DataError(f"the site's prepared features differ from the run's ({detail or 'another order'}): "
                        "prepare the site with the run's study")
    described = run.manifest.get("model", {})
    tensors = SiteTensors.from_prepared(prepared, run.scaler,
                                        image_size=int(described.get("image_size", 0)) or None)
    idx = _rows(run, prepared, rows)
    p = predict_proba(run.model(), tensors, idx)
    x = np.asarray(prepared.x, dtype=np.float64)
    age = x[idx, names.index("age")] if "age" in names else None
    return {"y": np.asarray(prepared.y, dtype=np.float64)[idx], "p": np.asarray(p, dtype=np.float64),
            "age": age, "sex": _sex(prepared, idx), "rows": idx}


def validate_site(run: TrainedRun, prepared: Any, k: int, rows: str = "all") -> dict[str, Any]:
    """The site's releasable validation result (:func:`omopfl.plp_metrics.performance`)."""
    from omopfl.plp_metrics import performance

    scored = score_site(run, prepared, rows)
    result = performance(scored["y"], scored["p"], k, age=scored["age"], sex=scored["sex"])
    return {"version": 1, "site": prepared.site, "rows": rows, "min_cell_count": int(k),
            "run_study_hash": run.manifest.get("study_hash"),
            "site_study_hash": (prepared.manifest or {}).get("study_hash"),
            "model": run.manifest.get("model", {}).get("kind"), **result}


def _plot(result: dict[str, Any], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = result.get("thresholds", [])
    fig, ax = plt.subplots(figsize=(4.8, 4.5), constrained_layout=True)
    points = sorted({(0.0, 0.0), (1.0, 1.0), *((1 - (r["specificity"] or 0.0), r["sensitivity"] or 0.0)
                                                 for r in table)})
    fpr, tpr = [a for a, _ in points], [b for _, b in points]
    ax.plot(fpr, tpr, marker="o", color="#1f6f8b", label=f"AUC {result.get('auc')}")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC ({result['site']}, released points)")
    ax.legend(loc="lower right")
    fig.savefig(folder / "roc.png", dpi=110)
    plt.close(fig)
    groups = result.get("calibration", [])
    fig, ax = plt.subplots(figsize=(4.8, 4.5), constrained_layout=True)
    ax.plot([g["mean_predicted"] for g in groups], [g["observed"] for g in groups], marker="o", color="#8b1f4f")
    top = max([0.05] + [max(g["mean_predicted"] or 0, g["observed"] or 0) for g in groups])
    ax.plot([0, top], [0, top], ls="--", color="grey", lw=0.8)
    ax.set(xlabel="mean predicted risk", ylabel="observed rate",
           title=f"calibration (slope {result.get('calibration_slope')})")
    fig.savefig(folder / "calibration.png", dpi=110)
    plt.close(fig)


def _markdown(result: dict[str, Any]) -> str:
    lines = [f"# External validation at {result['site']}", "",
             f"- rows: {result['rows']}; model: {result.get('model')}; min_cell_count {result['min_cell_count']}",
             f"- run study hash {result.get('run_study_hash')}; site dataset study hash "
             f"{result.get('site_study_hash')}", ""]
    if result.get("withheld"):
        return "\n".join([*lines, f"Withheld: {result['reason']}.", ""])
    ci = result["auc_ci95"]
    lines += ["| measure | value |", "|---|---|", f"| persons | {result['n']} |",
              f"| outcomes | {result['outcomes']} |",
              f"| AUC (95% CI) | {result['auc']} ({ci[0]}-{ci[1]}) |", f"| AUPRC | {result['auprc']} |",
              f"| Brier | {result['brier']} |", f"| calibration slope | {result['calibration_slope']} |",
              f"| calibration intercept | {result['calibration_intercept']} |", "",
              "## Thresholds", "", "| threshold | sensitivity | specificity | PPV | NPV |", "|---|---|---|---|---|"]
    lines += [f"| {r['threshold']} | {r['sensitivity']} | {r['specificity']} | {r['ppv']} | {r['npv']} |"
              for r in result["thresholds"]]
    for what, rows in result.get("demographics", {}).items():
        lines += ["", f"## By {what.replace('_', ' ')}", "", "| group | persons | outcomes | observed | predicted |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['group']} | {r['n']} | {r['outcomes']} | {r['observed']} | {r['mean_predicted']} |"
                  for r in rows]
    lines += ["", "![ROC](roc.png) ![calibration](calibration.png)", ""]
    return "\n".join(lines)


def write_validation(result: dict[str, Any], out: str | Path) -> Path:
    """Write ``validation.json``, ``roc.png``, ``calibration.png``, ``validation.md`` into ``out``,
    replacing an earlier result only once the new one is complete."""
    from omopfl.federation.coordinator.statistics import write_json

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_json(tmp / "validation.json", result)
        if not result.get("withheld"):
            _plot(result, tmp)
        (tmp / "validation.md").write_text(_markdown(result))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_validation_report(federated: dict[str, Any], path: str | Path) -> Path:
    """The coordinator's report of a federated validation: a summary table, then each site's section
    (its folder beside the report holds its plots), then the sites that did not validate."""
    from omopfl.federation import codec

    path = Path(path)
    sites = federated.get("sites", {})
    lines = ["# Federated external validation", "",
             f"- run {federated.get('run_dir')}; study hash {federated.get('study_hash')}; "
             f"model {federated.get('model')}; rows {federated.get('rows')}",
             f"- {len(sites)} site(s) validated of {federated.get('connected')} connected", "",
             "| site | persons | outcomes | AUC (95% CI) | AUPRC | Brier | calibration slope |",
             "|---|---|---|---|---|---|---|"]
    for name, r in sorted(sites.items()):
        if r.get("withheld"):
            lines.append(f"| {name} | withheld | | | | | |")
            continue
        ci = r.get("auc_ci95") or [None, None]
        lines.append(f"| {name} | {r.get('n')} | {r.get('outcomes')} | {r.get('auc')} ({ci[0]}-{ci[1]}) | "
                     f"{r.get('auprc')} | {r.get('brier')} | {r.get('calibration_slope')} |")
    for name, r in sorted(sites.items()):
        section = _markdown(r).replace("# External validation at", "## External validation at")
        section = section.replace("\n## ", "\n### ").replace("\n### External validation at", "\n## External "
                                                                                              "validation at")
        section = section.replace("(roc.png)", f"({name}/roc.png)").replace("(calibration.png)",
                                                                            f"({name}/calibration.png)")
        lines += ["", section]
    refused = federated.get("refused", [])
    if refused:
        lines += ["", "## Not validated", ""]
        lines += [f"- {r.get('site') or 'node ' + str(r.get('node'))}: "
                  f"{codec.ERROR_TEXT.get(r['code'], r['code'])} ({r['code']})" for r in refused]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
