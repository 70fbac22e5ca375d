"""Benchmark: federated training of many sites in one process; seconds per round and peak memory; prints JSON.

What it measures
    For each site count ``N`` (``--sites``, default 10 25 50), in a temporary folder:

    1. ``N`` synthetic OMOP CDM sites on the embedded default (DuckDB) of ``--persons`` persons on
       average (the synthetic default spread of sizes), each site's cohorts built, its dataset
       prepared and the study approved (``bench/benchsites.py``), in a child process;
    2. in a second, fresh child process, omopfl's own federated run in process
       (:func:`omopfl.federation.local.run_training`, ``mode="inprocess"``: the real ServerApp and
       one real ClientApp per site on Flower's in-process grid, through the site's trust boundary,
       the statistics phase, ``--rounds`` FedAvg rounds with federated evaluation).

    Per site count it reports the seconds of the statistics phase, the seconds per round (median
    of the rounds after the first, from the run's ``metrics.json``; the first round also warms each
    site's worker), the seconds of the whole run, and the training child's peak resident memory
    (``ru_maxrss``; the preparation child's peak beside it), also divided by the site count.

Settings
    The study is ``bench/fed_vs_pooled_study.toml`` (logistic model, tabular features of the
    t2dm_hf study, threshold 0.2) with ``rounds`` set by ``--rounds`` (default 5) and ``min_sites``
    2; torch on one thread.  Sites are generated without images or omics files.  ``--persons 1000``
    gives about 130 cohort persons per site; every site is sent every message, and a site whose
    train or test split is below its ``min_cell_count`` replies with nothing learnt from it
    (``sites_trained`` per round says how many trained).

Usage::

    .venv/bin/python bench/scale_bench.py
    .venv/bin/python bench/scale_bench.py --sites 10 25 50 --persons 1000 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STUDY = HERE / "fed_vs_pooled_study.toml"


def _log(message: str) -> None:
    print(f"[scale_bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def _study(folder: Path, rounds: int) -> Path:
    text = STUDY.read_text().replace('"../cohorts/', f'"{ROOT}/cohorts/')
    text = re.sub(r"(?m)^rounds = .*$", f"rounds = {rounds}", text, count=1)
    text = re.sub(r"(?m)^min_sites = .*$", "min_sites = 2", text, count=1)
    path = folder / "study.toml"
    path.write_text(text)
    return path


def _child_prepare(folder: Path, n_sites: int, persons: int, seed: int, rounds: int) -> dict[str, Any]:
    sys.path.insert(0, str(HERE))
    from benchsites import make_sites, prepare_and_approve

    t = time.perf_counter()
    summaries = make_sites(folder, n_sites, persons, seed)
    synth = time.perf_counter() - t
    study = _study(folder, rounds)
    adapters = [Path(s.adapter) for s in summaries]
    t = time.perf_counter()
    sites = prepare_and_approve(study, adapters, folder / "prepared")
    prepare = time.perf_counter() - t
    (folder / "adapters.json").write_text(json.dumps([str(a) for a in adapters]))
    return {"persons": sum(int(s.persons) for s in summaries),
            "cohort_persons": sum(s["cohort_persons"] for s in sites),
            "seconds": {"synth": round(synth, 1), "prepare": round(prepare, 1)},
            "peak_rss_mb": round(_peak_mb(), 1)}


def _child_train(folder: Path) -> dict[str, Any]:
    import logging

    import torch

    import omopfl.federation.local as train  # imports Flower, whose logger is then quieted

    logging.getLogger("flwr").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    adapters = [Path(a) for a in json.loads((folder / "adapters.json").read_text())]
    t = time.perf_counter()
    manifest = train.run_training(folder / "study.toml", adapters, folder / "prepared", mode="inprocess",
                                  out_dir=folder / "run")
    total = time.perf_counter() - t
    rows = json.loads((folder / "run" / "metrics.json").read_text())["rounds"]
    seconds = [float(r["seconds"]) for r in rows]
    final = manifest.get("final") or {}
    return {"rounds": len(rows), "sites_trained": [int(r["sites"]) for r in rows],
            "seconds_first_round": round(seconds[0], 3),
            "seconds_per_round": round(statistics.median(seconds[1:] or seconds), 3),
            "seconds_stats": manifest["seconds"]["stats"], "seconds_run": round(total, 1),
            "final_auc": final.get("eval_auc"), "train_n": final.get("train_n"),
            "peak_rss_mb": round(_peak_mb(), 1)}


def _child(args: argparse.Namespace) -> int:
    folder = Path(args.child_folder)
    out = (_child_prepare(folder, args.child_sites, args.persons, args.seed, args.rounds) if args.child == "prepare"
           else _child_train(folder))
    print(json.dumps(out))
    return 0


def _run_child(kind: str, folder: Path, n_sites: int, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--child-folder", str(folder),
               "--child-sites", str(n_sites), "--persons", str(args.persons), "--seed", str(args.seed),
               "--rounds", str(args.rounds)]
    env = {**os.environ, "OMOPFL_CACHE_DIR": str(folder / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} child for {n_sites} sites failed ({done.returncode}): "
                           f"{done.stderr.strip().splitlines()[-1:] or ''}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 25, 50], help="site counts (2 to 100)")
    parser.add_argument("--persons", type=int, default=1000, help="mean persons per site")
    parser.add_argument("--rounds", type=int, default=5, help="FedAvg rounds")
    parser.add_argument("--seed", type=int, default=42, help="seed of the synthetic sites")
    parser.add_argument("--child", choices=["prepare", "train"], help=argparse.SUPPRESS)
    parser.add_argument("--child-folder", help=argparse.SUPPRESS)
    parser.add_argument("--child-sites", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args)
    if any(not 2 <= n <= 100 for n in args.sites) or args.persons < 50 or args.rounds < 2:
        parser.error("--sites must be 2 to 100, --persons at least 50 and --rounds at least 2")
    results = []
    for n_sites in args.sites:
        with tempfile.TemporaryDirectory(prefix=f"omopfl-scale-{n_sites}-") as tmp:
            folder = Path(tmp)
            _log(f"{n_sites} sites: generating and preparing")
            prepared = _run_child("prepare", folder, n_sites, args)
            _log(f"{n_sites} sites: {prepared['cohort_persons']} cohort persons prepared "
                 f"({prepared['seconds']}); training")
            trained = _run_child("train", folder, n_sites, args)
            _log(f"{n_sites} sites: {trained['seconds_per_round']} s per round, peak {trained['peak_rss_mb']} MB")
        results.append({"sites": n_sites, "persons": prepared["persons"], "cohort_persons": prepared["cohort_persons"],
                        "prepare": prepared, **trained,
                        "peak_rss_mb_per_site": round(trained["peak_rss_mb"] / n_sites, 2)})
    print(json.dumps({
        "benchmark": "in-process federated training (real ServerApp + one ClientApp per site), logistic model",
        "study": str(STUDY.relative_to(ROOT)), "persons_per_site_mean": args.persons, "rounds": args.rounds,
        "seed": args.seed, "results": results,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
    }, indent=2))
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as the omopfl command does: skip DuckDB's noisy interpreter teardown
