"""Benchmark: FedAvg, FedProx, FedNova and SCAFFOLD side by side on label-skewed (non-IID) sites; prints JSON.

What it measures
    In a temporary folder:

    1. ``--sites`` synthetic OMOP CDM sites (DuckDB) from :func:`omopfl.synth.run_synth` with
       ``label_skew`` (``--label-skew``, default 0.95: the outcome in 5 % of the diabetics at sites
       a, c, ... and in 95 % at sites b, d, ...; as ``omopfl synth --label-skew 0.95``), no images or
       omics; the study's cohorts built in each site's database;
    2. for each strategy, the study ``bench/fed_vs_pooled_study.toml`` (logistic model) with its
       ``[training]`` replaced by the strategy's (below), every site prepared and approving it (a
       strategy is part of what a site approves), and :func:`omopfl.federation.local.run_training`
       in process for ``--rounds`` rounds;
    3. per strategy: the final federated AUC as released (the test-row-weighted mean of the sites'
       own AUCs; a site withholds its evaluation when a confusion cell at the study's threshold is
       below its min_cell_count, which label skew makes likely, so it may be null), the same mean
       computed here from the trained model on every site's test rows (``site_weighted_auc``, not
       under the release rule: a bench on synthetic data), the AUC over all sites' test rows together
       (``all_rows_auc``), rounds and seconds.

Settings (the same for every strategy, so only the aggregation differs)
    Local plain SGD at ``--lr`` (default 0.1) on batches of 32, one local epoch per round (a site
    takes as many steps as it has batches: the heterogeneous local work FedNova normalises),
    ``--rounds`` (default 20) rounds.  FedProx adds ``proximal_mu = --mu`` (0.01); SCAFFOLD uses the
    global step 1.0 (option II control variates).  Torch runs on one thread.

Usage::

    .venv/bin/python bench/noniid_bench.py
    .venv/bin/python bench/noniid_bench.py --sites 4 --persons 3000 --rounds 20 --plot noniid.png
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BASE_STUDY = Path(__file__).resolve().parent / "fed_vs_pooled_study.toml"
STRATEGIES = ("fedavg", "fedprox", "fednova", "scaffold")
CACHE_ENV = ("OMOPFL_CACHE_DIR", "OMOPFL_IMAGE_CACHE")


def _log(message: str) -> None:
    print(f"[noniid_bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _round(value: Any, digits: int = 4) -> float | None:
    return round(float(value), digits) if isinstance(value, int | float) and math.isfinite(float(value)) else None


def study_text(strategy: str, rounds: int, lr: float, mu: float) -> str:
    """The base study with absolute cohort paths, no linked files and the strategy's ``[training]``."""
    text = BASE_STUDY.read_text().replace('"../cohorts/', f'"{ROOT}/cohorts/')
    text = text.replace("enabled = true", "enabled = false")
    head = text[:text.index("\n[training]\n") + 1]
    extra = {"fedavg": "", "fedprox": f"proximal_mu = {mu}\n", "fednova": "", "scaffold": "eta = 1.0\n"}[strategy]
    return head + (f'[training]\nrounds = {rounds}\nlocal_epochs = 1\nbatch_size = 32\nlearning_rate = {lr}\n'
                   f'strategy = "{strategy}"\n{extra}optimizer = "sgd"\nmin_sites = 2\ntest_fraction = 0.25\n'
                   'seed = 0\nthreshold = 0.2\n')


def _prepare(adapters: list[Path], study: Path, prepared_dir: Path, build: bool) -> int:
    from omopfl import policy
    from omopfl.cohort import build_cohorts, load_definition
    from omopfl.config import load_site
    from omopfl.db import site_engine
    from omopfl.prepare import prepare_site
    from omopfl.study import load_study

    spec = load_study(study)
    definitions = [load_definition(spec.target_cohort), load_definition(spec.outcome_cohort)]
    persons = 0
    for adapter in adapters:
        site = load_site(adapter)
        engine = site_engine(site)
        try:
            if build:
                build_cohorts(engine, site, [(d, d.default_id) for d in definitions], replace=True)
            _folder, manifest = prepare_site(engine, site, spec, prepared_dir)
        finally:
            engine.dispose()
        policy.approve(site, spec)
        persons += int(manifest["persons"])
    return persons


def _scores(run_dir: Path, prepared_dir: Path, names: list[str]) -> dict[str, Any]:
    """AUCs of the trained model on every site's test rows, computed here (bench only, synthetic sites)."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from omopfl.external_validation import load_run, score_site
    from omopfl.prepare import load_prepared

    run = load_run(run_dir)
    ys, ps, weighted, total = [], [], 0.0, 0
    per_site = {}
    for name in names:
        scored = score_site(run, load_prepared(prepared_dir / name), rows="test")
        y, p = scored["y"], scored["p"]
        ys.append(y)
        ps.append(p)
        auc = roc_auc_score(y, p) if 0 < y.sum() < y.size else None
        per_site[name] = {"test_rows": int(y.size), "positives": int(y.sum()), "auc": _round(auc)}
        if auc is not None:
            weighted += auc * y.size
            total += y.size
    y_all, p_all = np.concatenate(ys), np.concatenate(ps)
    return {"site_weighted_auc": _round(weighted / total) if total else None,
            "all_rows_auc": _round(roc_auc_score(y_all, p_all)), "sites": per_site}


def run_bench(n_sites: int, persons: int, seed: int, skew: float, rounds: int, lr: float, mu: float) -> dict[str, Any]:
    from omopfl.federation.local import run_training
    from omopfl.synth import run_synth

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="omopfl-noniid-") as tmp_name:
        tmp = Path(tmp_name)
        os.environ["OMOPFL_CACHE_DIR"] = str(tmp / "cache")
        os.environ["OMOPFL_IMAGE_CACHE"] = str(tmp / "image_cache")
        t = time.perf_counter()
        summaries = run_synth(out_dir=tmp / "sites", n_sites=n_sites, persons=n_sites * persons, seed=seed,
                              image_share=0.0, omics_share=0.0, adapters_dir=tmp / "adapters", progress=False,
                              label_skew=skew)
        adapters = [Path(s.adapter) for s in summaries]
        names = [s.site for s in summaries]
        out["synth_seconds"] = round(time.perf_counter() - t, 1)
        _log(f"{n_sites} label-skewed sites generated in {out['synth_seconds']} s")
        results = {}
        for k, strategy in enumerate(STRATEGIES):
            study = tmp / f"study_{strategy}.toml"
            study.write_text(study_text(strategy, rounds, lr, mu))
            prepared = tmp / f"prepared_{strategy}"
            t = time.perf_counter()
            cohort_persons = _prepare(adapters, study, prepared, build=k == 0)
            prepare_seconds = time.perf_counter() - t
            t = time.perf_counter()
            manifest = run_training(study, adapters, prepared, mode="inprocess", out_dir=tmp / f"run_{strategy}")
            seconds = time.perf_counter() - t
            final = manifest.get("final") or {}
            scores = _scores(tmp / f"run_{strategy}", prepared, names)
            results[strategy] = {"federated_auc_released": _round(final.get("eval_auc")),
                                 "released_eval_n": final.get("eval_n"), **scores,
                                 "rounds": int(final.get("round", 0)), "train_loss": _round(final.get("train_loss")),
                                 "seconds": {"prepare": round(prepare_seconds, 1), "training": round(seconds, 1),
                                             "per_round": round(seconds / max(1, rounds), 2)}}
            out["cohort_persons"] = cohort_persons
            _log(f"{strategy}: all-rows AUC {scores['all_rows_auc']}, site-weighted {scores['site_weighted_auc']}, "
                 f"released {results[strategy]['federated_auc_released']} in {seconds:.1f} s")
        out["strategies"] = results
    return out


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["strategies"])
    values = [result["strategies"][n]["all_rows_auc"] or 0.0 for n in names]
    weighted = [result["strategies"][n]["site_weighted_auc"] or 0.0 for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], values, width=0.4, label="all test rows")
    ax.bar([x + 0.2 for x in xs], weighted, width=0.4, label="site-weighted")
    ax.set_xticks(list(xs), names)
    ax.set_ylim(0.5, 1.0)
    ax.set_ylabel("AUC")
    ax.set_title(f"{result['settings']['sites']} sites, label skew {result['settings']['label_skew']}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sites", type=int, default=4, help="number of sites (2 to 100)")
    parser.add_argument("--persons", type=int, default=3000, help="mean persons per site")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--label-skew", type=float, default=0.95, help="outcome share at the skewed sites")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.1, help="local SGD learning rate")
    parser.add_argument("--mu", type=float, default=0.01, help="FedProx proximal_mu")
    parser.add_argument("--plot", type=Path, default=None, help="write a bar chart PNG here")
    parser.add_argument("--verbose", action="store_true", help="keep Flower's INFO logs on stderr")
    args = parser.parse_args()
    if not args.verbose:
        import omopfl.federation.local  # noqa: F401  (Flower sets its logger on import)

        logging.getLogger("flwr").setLevel(logging.WARNING)
    import torch

    torch.set_num_threads(1)
    saved = {key: os.environ.get(key) for key in CACHE_ENV}
    started = time.perf_counter()
    try:
        result = run_bench(args.sites, args.persons, args.seed, args.label_skew, args.rounds, args.lr, args.mu)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    result = {"settings": {"sites": args.sites, "persons_per_site": args.persons, "seed": args.seed,
                           "label_skew": args.label_skew, "rounds": args.rounds, "local_sgd_lr": args.lr,
                           "fedprox_mu": args.mu, "batch_size": 32, "local_epochs": 1, "model": "logistic"},
              **result, "seconds_total": round(time.perf_counter() - started, 1),
              "machine": {"python": platform.python_version(), "cpus": os.cpu_count()}}
    if args.plot is not None:
        _plot(result, args.plot)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
