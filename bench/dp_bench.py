"""Benchmark: federated AUC with DP-SGD at each site (epsilon 1, 3, 8 per site over the whole study) beside no DP; JSON.

What it measures
    In a temporary folder:

    1. three synthetic OMOP CDM sites on the embedded default (DuckDB) from
       :func:`omopfl.synth.run_synth` (``--persons`` on average per site, the synthetic default
       spread of sizes; no images or omics), once;
    2. per privacy level (no DP, and each of ``--epsilons``) a study: ``examples/t2dm_hf/study.toml``
       with imaging and omics disabled, ``--rounds`` rounds of ``--local-epochs`` epochs, batch
       ``--batch-size``, learning rate ``--lr``, and for a DP level ``[privacy] dp_sgd = true``,
       ``target_epsilon`` = the level, ``budget_epsilon`` = the level, ``delta``, ``max_grad_norm``.
       Every level is its own study (its own hash), so each site prepares it
       (:func:`omopfl.prepare.prepare_site`, cohorts built in the site's database) and approves it
       (:func:`omopfl.policy.approve`) as a data engineer would;
    3. omopfl's own federated run, :func:`omopfl.federation.local.run_training` in process: the real
       ServerApp and the sites' ClientApps through Flower's in-process grid, the site's trust boundary,
       the statistics phase and global scaler, FedAvg rounds, each site's DP-SGD (Opacus, noise
       calibrated from the approved study for its own train rows, charged to its budget ledger) and
       the final federated evaluation under the release rule.

    Every ``--train-seeds`` value is the study's ``[training] seed`` (split and initial model), so again its
    own study (a site's budget for a study is spent after one run: a repeat of the same study is refused).
    Reported per level: the final federated AUC (n-weighted over the sites that released their
    evaluation) averaged over the seeds and per seed, the epsilon each site reported spending (the run
    manifest's ``privacy``) and the seconds (preparing, training).  The script reports; it asserts nothing.

Usage::

    .venv/bin/python bench/dp_bench.py
    .venv/bin/python bench/dp_bench.py --persons 6000 --rounds 10 --epsilons 1 3 8 --train-seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchsites import make_sites, prepare_and_approve  # noqa: E402  (bench/ is not a package)

CACHE_ENV = ("OMOPFL_CACHE_DIR", "OMOPFL_IMAGE_CACHE")


def _log(message: str) -> None:
    print(f"[dp_bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _round(value: Any, digits: int = 4) -> float | None:
    return round(float(value), digits) if isinstance(value, int | float) and math.isfinite(float(value)) else None


def level_study(tmp: Path, tag: str, *, rounds: int, local_epochs: int, batch_size: int, lr: float, seed: int,
                epsilon: float | None, delta: float, max_grad_norm: float) -> Path:
    """The t2dm_hf study (no images/omics) with the benchmark's training settings and, for a DP level, DP-SGD."""
    import re

    text = (ROOT / "examples" / "t2dm_hf" / "study.toml").read_text()
    text = text.replace('"../../cohorts/', f'"{ROOT}/cohorts/').replace("enabled = true", "enabled = false")
    for key, value in (("rounds", rounds), ("local_epochs", local_epochs), ("batch_size", batch_size),
                       ("learning_rate", lr), ("seed", seed)):
        text = re.sub(rf"(?m)^{key} = .*$", f"{key} = {value}", text, count=1)
    if epsilon is not None:
        text += (f"\n[privacy]\ndp_sgd = true\ntarget_epsilon = {epsilon}\nbudget_epsilon = {epsilon}\n"
                 f"delta = {delta}\nmax_grad_norm = {max_grad_norm}\n")
    path = tmp / f"study_{tag}.toml"
    path.write_text(text)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--persons", type=int, default=6000, help="mean persons per synthetic site")
    parser.add_argument("--seed", type=int, default=42, help="seed of the synthetic sites")
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1],
                        help="study seeds (split and initial model) averaged over; each is its own study")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0], help="per-site budgets")
    parser.add_argument("--delta", type=float, default=1e-6)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for key in ("FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK"):
        os.environ.setdefault(key, "0" if key == "FLWR_TELEMETRY_ENABLED" else "1")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    import torch

    torch.set_num_threads(1)
    from omopfl.federation.local import run_training

    started = time.perf_counter()
    saved = {key: os.environ.get(key) for key in CACHE_ENV}
    results = []
    sites_info: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="omopfl-dp-bench-") as tmp_name:
            tmp = Path(tmp_name)
            os.environ["OMOPFL_CACHE_DIR"] = str(tmp / "cache")
            os.environ["OMOPFL_IMAGE_CACHE"] = str(tmp / "image_cache")
            adapters = [Path(s.adapter) for s in make_sites(tmp, 3, args.persons, args.seed)]
            synth_seconds = time.perf_counter() - started
            _log(f"3 synthetic sites in {synth_seconds:.1f} s")
            levels: list[float | None] = [None, *args.epsilons]
            for epsilon in levels:
                runs = []
                for seed in args.train_seeds:
                    tag = ("nodp" if epsilon is None else f"eps{epsilon:g}") + f"_seed{seed}"
                    study = level_study(tmp, tag, rounds=args.rounds, local_epochs=args.local_epochs,
                                        batch_size=args.batch_size, lr=args.lr, seed=seed, epsilon=epsilon,
                                        delta=args.delta, max_grad_norm=args.max_grad_norm)
                    t0 = time.perf_counter()
                    prepare_and_approve(study, adapters, tmp / f"prepared_{tag}")
                    t1 = time.perf_counter()
                    manifest = run_training(study, adapters, tmp / f"prepared_{tag}", mode="inprocess",
                                            out_dir=tmp / f"run_{tag}")
                    t2 = time.perf_counter()
                    if not sites_info:
                        sites_info = [{"site": s} for s in manifest["sites"]]
                    runs.append({"seed": seed, "final": manifest.get("final") or {},
                                 "privacy": manifest.get("privacy") or {}, "dropped": manifest.get("dropped") or [],
                                 "prepare": t1 - t0, "training": t2 - t1})
                aucs = [r["final"].get("eval_auc") for r in runs]
                known = [float(v) for v in aucs if isinstance(v, int | float) and math.isfinite(float(v))]
                results.append({
                    "epsilon": epsilon if epsilon is not None else "no DP",
                    "federated_auc": _round(sum(known) / len(known)) if known else None,
                    "federated_auc_per_seed": [_round(v) for v in aucs],
                    "federated_eval_n_per_seed": [r["final"].get("eval_n") for r in runs],
                    "epsilon_spent_per_site": [{k: _round(v) for k, v in r["privacy"].get("epsilon_per_site",
                                                                                         {}).items()} or None
                                               for r in runs],
                    "dropped": [d for r in runs for d in r["dropped"]],
                    "seconds": {"prepare": round(sum(r["prepare"] for r in runs), 1),
                                "training": round(sum(r["training"] for r in runs), 1)},
                })
                _log(f"epsilon {results[-1]['epsilon']}: federated AUC {results[-1]['federated_auc']} "
                     f"{results[-1]['federated_auc_per_seed']} {results[-1]['seconds']}")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    out = {
        "benchmark": "omopfl run_training (in-process Flower, real ServerApp/ClientApps) of a logistic model "
                     "with DP-SGD at every site vs no DP",
        "sites": sites_info,
        "training": {"rounds": args.rounds, "local_epochs": args.local_epochs, "batch_size": args.batch_size,
                     "learning_rate": args.lr, "optimizer": "adam", "strategy": "fedavg",
                     "train_seeds": args.train_seeds},
        "dp": {"delta": args.delta, "max_grad_norm": args.max_grad_norm, "accountant": "opacus rdp",
               "epsilon_is": "per site, whole study (all rounds), record-level, Poisson sampling"},
        "synthetic": {"persons_per_site_mean": args.persons, "seed": args.seed},
        "results": results,
        "seconds": {"total": round(time.perf_counter() - started, 1)},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip DuckDB's "nanobind: leaked ..." lines at interpreter exit
