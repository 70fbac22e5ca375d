"""Benchmark: FedAvg AUC with DP-SGD at each site (epsilon 1, 3, 8 per site over the whole study) beside no DP; JSON.

What it measures
    In a temporary folder, once:

    1. three synthetic OMOP CDM sites on the embedded default (DuckDB) from
       :func:`omopfl.synth.run_synth` (``--persons`` on average per site, the synthetic default
       spread of sizes; no images or omics);
    2. each site prepared for ``examples/t2dm_hf/study.toml`` with imaging and omics disabled
       (:func:`omopfl.prepare.prepare_site`, which builds the cohorts in the site's database), as
       ``tests/conftest.py`` does;
    3. the global scaler from the sites' pooled moments (what the federated statistics phase
       computes without DP on the statistics) and each site's stratified train/test split
       (:func:`omopfl.models.split` with the study's test fraction and seed).

    Then, for every privacy level (no DP, and ``--epsilons``) and every training seed
    (``--train-seeds``): FedAvg over the three sites for ``--rounds`` rounds, written out here in
    a few lines (each site trains the received global logistic model for ``--local-epochs``
    epochs; the server averages the weights by train rows; no Flower: the federation wiring of
    DP-SGD is the lead's part of issue 12).  Without DP a site trains with
    :func:`omopfl.models.train_local`; with DP with :func:`omopfl.dp.train_local_dp` at the noise
    :func:`omopfl.dp.calibrate` gives for its own train rows, so that its whole study spends
    epsilon at ``--delta``, and every site checks its budget before each round
    (:func:`omopfl.dp.would_exceed`).  Same optimizer (Adam), learning rate and batch size in
    every run.

    Reported per level: the federated AUC (n-weighted mean of the site test AUCs, as omopfl's
    federated evaluation computes it) and the AUC of all test predictions together, each averaged
    over the training seeds (with the per-seed values), the noise multiplier and epsilon spent per
    site, and the seconds.  The script reports; it asserts nothing.

Usage::

    .venv/bin/python bench/dp_bench.py
    .venv/bin/python bench/dp_bench.py --persons 6000 --rounds 10 --epsilons 1 3 8 --train-seeds 0 1
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

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CACHE_ENV = ("OMOPFL_CACHE_DIR", "OMOPFL_IMAGE_CACHE")


def _log(message: str) -> None:
    print(f"[dp_bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _round(value: Any, digits: int = 4) -> float | None:
    return round(float(value), digits) if isinstance(value, int | float) and math.isfinite(float(value)) else None


def prepare_sites(tmp: Path, persons: int, seed: int) -> tuple[Any, list[Any]]:
    """Three synthetic DuckDB sites prepared for the t2dm_hf study without images/omics: (study, prepared sites)."""
    from omopfl.config import load_site
    from omopfl.db import make_engine
    from omopfl.prepare import load_prepared, prepare_site
    from omopfl.study import load_study
    from omopfl.synth import run_synth

    text = (ROOT / "examples" / "t2dm_hf" / "study.toml").read_text()
    text = text.replace('"../../cohorts/', f'"{ROOT}/cohorts/').replace("enabled = true", "enabled = false")
    (tmp / "study.toml").write_text(text)
    study = load_study(tmp / "study.toml")
    summaries = run_synth(tmp / "synth", n_sites=3, persons=3 * persons, seed=seed, image_share=0.0,
                          omics_share=0.0, adapters_dir=tmp / "adapters", progress=False)
    prepared = []
    for summary in summaries:
        site = load_site(summary.adapter)
        engine = make_engine(site.database_url())
        try:
            folder, _manifest = prepare_site(engine, site, study, tmp / "prepared")
        finally:
            engine.dispose()
        prepared.append(load_prepared(folder))
    return study, prepared


def fedavg(sites: list[dict[str, Any]], *, rounds: int, local_epochs: int, batch_size: int, lr: float,
           seed: int, epsilon: float | None, delta: float, max_grad_norm: float) -> dict[str, Any]:
    """FedAvg of a logistic model over ``sites`` (``tensors``, ``train``, ``test``), with DP-SGD when ``epsilon``."""
    from omopfl import dp
    from omopfl.models import build_model, evaluate, get_weights, set_weights, train_local, weighted_average
    from omopfl.study import ModelSpec

    spec = ModelSpec(kind="logistic")
    n_features = sites[0]["tensors"].n_features
    global_model = build_model(spec, n_features, seed=seed)
    budget = dp.DPSpec(epsilon, delta, max_grad_norm) if epsilon is not None else None
    noise = [dp.calibrate(budget, s["train"].size, batch_size, local_epochs, rounds) if budget else 0.0
             for s in sites]
    histories: list[list[dp.Step]] = [[] for _ in sites]
    for r in range(1, rounds + 1):
        updates = []
        for i, site in enumerate(sites):
            local = build_model(spec, n_features)
            set_weights(local, get_weights(global_model))
            if budget is None:
                stats = train_local(local, site["tensors"], site["train"], epochs=local_epochs,
                                    batch_size=batch_size, lr=lr, seed=seed * 1000 + r)
            else:
                stats = dp.train_local_dp(local, site["tensors"], site["train"], epochs=local_epochs,
                                          batch_size=batch_size, lr=lr, noise_multiplier=noise[i],
                                          max_grad_norm=max_grad_norm, seed=seed * 1000 + 10 * r + i,
                                          history=histories[i], delta=delta, target_epsilon=epsilon)
            updates.append((int(stats["n"]), get_weights(local)))
        total = sum(n for n, _ in updates)
        set_weights(global_model, [sum(n * w[k] for n, w in updates) / total for k in range(len(updates[0][1]))])
    per_site = [evaluate(global_model, s["tensors"], s["test"]) for s in sites]
    federated = weighted_average([(int(s["test"].size), m) for s, m in zip(sites, per_site, strict=True)])
    from omopfl.models import binary_metrics, predict_proba

    y = np.concatenate([s["tensors"].y.numpy()[s["test"]] for s in sites])
    p = np.concatenate([predict_proba(global_model, s["tensors"], s["test"]) for s in sites])
    return {"federated_auc": federated["auc"], "all_rows_auc": binary_metrics(y, p)["auc"],
            "site_auc": [m["auc"] for m in per_site], "noise_multiplier": noise,
            "epsilon_spent": [dp.epsilon_spent(h, delta) for h in histories] if budget else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--persons", type=int, default=6000, help="mean persons per synthetic site")
    parser.add_argument("--seed", type=int, default=42, help="seed of the synthetic sites")
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1], help="training seeds averaged over")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0], help="per-site budgets")
    parser.add_argument("--delta", type=float, default=1e-6)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from omopfl.models import SiteTensors, split
    from omopfl.stats import Moments, Scaler

    started = time.perf_counter()
    saved = {key: os.environ.get(key) for key in CACHE_ENV}
    try:
        with tempfile.TemporaryDirectory(prefix="omopfl-dp-bench-") as tmp_name:
            tmp = Path(tmp_name)
            os.environ["OMOPFL_CACHE_DIR"] = str(tmp / "cache")
            os.environ["OMOPFL_IMAGE_CACHE"] = str(tmp / "image_cache")
            study, prepared = prepare_sites(tmp, args.persons, args.seed)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    prepare_seconds = time.perf_counter() - started
    features = list(prepared[0].feature_names)
    scaler = Scaler.from_moments(Moments.from_array(np.concatenate([np.asarray(p.x, float) for p in prepared]),
                                                    features))
    t = study.training
    sites = []
    for p in prepared:
        tensors = SiteTensors.from_prepared(p, scaler)
        train, test = split(tensors.n, float(t.test_fraction), int(t.seed), p.y)
        sites.append({"site": p.site, "tensors": tensors, "train": train, "test": test})
    _log(f"3 sites prepared in {prepare_seconds:.1f} s: train rows {[int(s['train'].size) for s in sites]}, "
         f"test rows {[int(s['test'].size) for s in sites]}")

    levels: list[float | None] = [None, *args.epsilons]
    results = []
    for epsilon in levels:
        t0 = time.perf_counter()
        runs = [fedavg(sites, rounds=args.rounds, local_epochs=args.local_epochs, batch_size=args.batch_size,
                       lr=args.lr, seed=s, epsilon=epsilon, delta=args.delta, max_grad_norm=args.max_grad_norm)
                for s in args.train_seeds]
        seconds = time.perf_counter() - t0
        fed = [r["federated_auc"] for r in runs]
        pooled = [r["all_rows_auc"] for r in runs]
        results.append({
            "epsilon": epsilon if epsilon is not None else "no DP",
            "federated_auc": _round(float(np.mean(fed))),
            "federated_auc_per_seed": [_round(v) for v in fed],
            "all_rows_auc": _round(float(np.mean(pooled))),
            "noise_multiplier_per_site": [_round(v) for v in runs[0]["noise_multiplier"]],
            "epsilon_spent_per_site": ([_round(v) for v in runs[0]["epsilon_spent"]]
                                       if runs[0]["epsilon_spent"] is not None else None),
            "seconds": round(seconds, 1),
        })
        _log(f"epsilon {results[-1]['epsilon']}: federated AUC {results[-1]['federated_auc']} in {seconds:.1f} s")
    out = {
        "benchmark": "FedAvg (hand-written, in process) of a logistic model with DP-SGD at every site vs no DP",
        "sites": [{"site": s["site"], "train_rows": int(s["train"].size), "test_rows": int(s["test"].size),
                   "test_outcomes": int(s["tensors"].y.numpy()[s["test"]].sum())} for s in sites],
        "training": {"rounds": args.rounds, "local_epochs": args.local_epochs, "batch_size": args.batch_size,
                     "learning_rate": args.lr, "optimizer": "adam", "train_seeds": args.train_seeds},
        "dp": {"delta": args.delta, "max_grad_norm": args.max_grad_norm, "accountant": "opacus rdp",
               "epsilon_is": "per site, whole study (all rounds), record-level, Poisson sampling"},
        "synthetic": {"persons_per_site_mean": args.persons, "seed": args.seed},
        "results": results,
        "seconds": {"prepare": round(prepare_seconds, 1), "total": round(time.perf_counter() - started, 1)},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip DuckDB's "nanobind: leaked ..." lines at interpreter exit
