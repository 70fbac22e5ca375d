"""Benchmark: federated AUC beside the pooled (centralized) baseline AUC, for 3, 5 and 10 sites; prints JSON.

What it measures
    For each site count ``k`` (``--sites``, default 3 5 10), in a temporary folder:

    1. ``k`` synthetic OMOP CDM sites on the embedded default (DuckDB, no server) from
       :func:`omopfl.synth.run_synth` (``--seed``; ``--persons`` is the mean site size: a total of
       ``k * persons`` split in the proportion of the synthetic default spread, so the sites keep
       different sizes, besides their different age/sex mix, prevalence and glucose units);
    2. the study's target and outcome cohorts built in each site's database
       (:func:`omopfl.cohort.build_cohorts`, as ``omopfl demo`` does) and each site's dataset
       prepared and validated (:func:`omopfl.prepare.prepare_site`);
    3. federated training, :func:`omopfl.federation.local.run_training` in process (statistics phase,
       global scaler, the study's strategy for ``rounds`` rounds, federated evaluation);
    4. the pooled baseline, :func:`omopfl.pooled.train_pooled`: the same model, scaler rule,
       batch size, learning rate and per-site train/test split, trained centrally on the
       concatenated train rows for ``rounds * local_epochs`` epochs.

    An image model (``bench/densenet_study.toml``: DenseNet-121 on the linked MR slices) gets sites
    with linked DICOM images (``--image-share``, default 0.9 of the target persons); a tabular model
    gets none.

    Per site count it reports the federated AUC (``manifest["final"]["eval_auc"]``), the pooled
    site-weighted AUC, the pooled all-rows AUC, their absolute difference, whether it is within
    0.02 and the seconds each phase took.  The script exits 0 whatever the difference: it reports.

Why the pooled *site-weighted* AUC is the comparable figure
    The federated AUC is what omopfl's federated evaluation yields: every site computes the AUC of
    its own test rows and the server takes the mean weighted by test rows.  That is not the AUC of
    all test predictions together (``metrics.pooled.auc``): the pooled AUC also ranks persons of
    different sites against each other, so it moves with between-site differences in prevalence and
    case mix even for one same model.  ``train_pooled`` therefore also evaluates the centralized
    model site by site on the same test rows and takes the same n-weighted mean
    (``metrics.site_weighted.auc``); comparing that with the federated figure isolates what
    federation changes (the training), not how the AUC is aggregated.  The all-rows AUC is reported
    beside it for information.

Settings
    The default study is ``bench/fed_vs_pooled_study.toml``: the demo study
    (``examples/t2dm_hf/study.toml``) with only its ``[training]`` changed (see the comments there):
    50 rounds of 1 local epoch, Adam at learning rate 0.01 on batches of 32.  Both runs read the same
    study, so they share every setting.  The demo's settings (5 rounds of 2 local epochs at 0.05 on
    batches of 64) stop while the weights of both runs still jitter: with 3 and 5 sites of 6,000
    persons on average and seeds 42, 7 and 1 they gave differences up to 0.020, the bench settings up
    to 0.005.  The logistic model uses the tabular features only, so the sites are generated without
    linked DICOM images or omics files (``image_share = omics_share = 0``), which would only add time.
    ``--persons 6000`` (about 13 % of them enter the target cohort) gives 585 to 2,040 test rows; at
    half that size the 3-site comparison has 276 test rows and the difference of seed 42 was 0.017.
    Torch runs on one thread (faster for this model, and steady timings on a busy 2-core machine).

    Even converged, FedAvg does not aim at exactly the pooled optimum: a site trains one *epoch* per
    round, i.e. a number of steps proportional to its rows, and its update is then weighted by its
    rows again, so for small steps the federated fixed point minimises the sum of the sites' mean
    losses weighted by their squared sizes, while the pooled model weights them by their sizes
    (the "objective inconsistency" of FedAvg, which FedNova corrects).  With the synthetic default
    spread of site sizes (largest about 2.5 times the smallest) the two optima differed by up to
    0.013 of site-weighted AUC (3 sites, 3,000 persons on average, seed 42).

Everything created (sites, adapters, prepared data, run folders, the cohort SQL and image caches,
which are pointed into the temporary folder) is removed.  Progress goes to stderr (Flower's INFO
logs only with ``--verbose``); one JSON object goes to stdout.

Repeated runs (``--repeats N``, seeds ``seed .. seed + N - 1``: new synthetic sites and splits each time)
    add ``repeated.by_sites``: per site count the N federated and pooled AUCs, the Wilcoxon rank-sum
    p-value, the paired mean difference with its 95% CI (:func:`omopfl.run_comparison.compare_runs`),
    and with ``--plot`` a box plot PNG.

Usage::

    .venv/bin/python bench/fed_vs_pooled.py
    .venv/bin/python bench/fed_vs_pooled.py --sites 3 5 10 --seed 42 --persons 6000 \
        --study bench/fed_vs_pooled_study.toml
    .venv/bin/python bench/fed_vs_pooled.py --repeats 10 --plot fed_vs_pooled.png
    .venv/bin/python bench/fed_vs_pooled.py --study bench/densenet_study.toml --sites 3 --repeats 5 \
        --persons 1500 --plot densenet.png
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchsites import make_sites, prepare_and_approve  # noqa: E402  (bench/ is not a package)

DEFAULT_STUDY = Path(__file__).resolve().parent / "fed_vs_pooled_study.toml"
TOLERANCE = 0.02
CACHE_ENV = ("OMOPFL_CACHE_DIR", "OMOPFL_IMAGE_CACHE")


def _log(message: str) -> None:
    print(f"[fed_vs_pooled {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _round(value: Any, digits: int = 4) -> float | None:
    return round(float(value), digits) if isinstance(value, int | float) and math.isfinite(float(value)) else None


def run_one(n_sites: int, persons: int, seed: int, study_path: Path, image_share: float = 0.0) -> dict[str, Any]:
    """Synthetic sites -> cohorts -> prepared data -> federated and pooled training, in a temporary folder."""
    from omopfl.federation.local import run_training
    from omopfl.pooled import train_pooled

    started = time.perf_counter()
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix=f"omopfl-fed-vs-pooled-{n_sites}-") as tmp_name:
        tmp = Path(tmp_name)
        os.environ["OMOPFL_CACHE_DIR"] = str(tmp / "cache")  # cohort SQL (and default image) cache
        os.environ["OMOPFL_IMAGE_CACHE"] = str(tmp / "image_cache")

        t = time.perf_counter()
        summaries = make_sites(tmp, n_sites, persons, seed, image_share=image_share)
        seconds["synth"] = time.perf_counter() - t
        adapters = [Path(s.adapter) for s in summaries]
        cdm_persons = [int(s.persons) for s in summaries]
        _log(f"{n_sites} sites: {sum(cdm_persons)} persons generated in {seconds['synth']:.1f} s ({cdm_persons})")

        t = time.perf_counter()
        prepared = prepare_and_approve(study_path, adapters, tmp / "prepared")
        seconds["prepare"] = time.perf_counter() - t
        _log(f"{n_sites} sites: cohorts built and sites prepared in {seconds['prepare']:.1f} s "
             f"({sum(p['cohort_persons'] for p in prepared)} cohort persons)")

        t = time.perf_counter()
        federated = run_training(study_path, adapters, tmp / "prepared", mode="inprocess", out_dir=tmp / "run")
        seconds["federated"] = time.perf_counter() - t
        final = federated.get("final") or {}
        _log(f"{n_sites} sites: federated AUC {final.get('eval_auc')} in {seconds['federated']:.1f} s")

        t = time.perf_counter()
        pooled = train_pooled(study_path, adapters, tmp / "prepared", out_dir=tmp / "pooled")
        seconds["pooled"] = time.perf_counter() - t
        metrics = pooled["metrics"]
        _log(f"{n_sites} sites: pooled site-weighted AUC {metrics['site_weighted'].get('auc')}, all rows "
             f"{metrics['pooled'].get('auc')} in {seconds['pooled']:.1f} s")
    seconds["total"] = time.perf_counter() - started

    fed_auc = final.get("eval_auc")
    weighted_auc = metrics["site_weighted"].get("auc")
    difference = (abs(float(fed_auc) - float(weighted_auc))
                  if fed_auc is not None and weighted_auc is not None else None)
    rows = pooled["config"]["rows"]
    return {
        "sites": n_sites,
        "persons": sum(cdm_persons),
        "persons_per_site": cdm_persons,
        "cohort_persons": sum(p["cohort_persons"] for p in prepared),
        "outcomes": sum(p["outcomes"] for p in prepared),
        "train_rows": sum(r["train"] for r in rows.values()),
        "test_rows": sum(r["test"] for r in rows.values()),
        "federated_auc": _round(fed_auc),
        "pooled_site_weighted_auc": _round(weighted_auc),
        "pooled_all_rows_auc": _round(metrics["pooled"].get("auc")),
        "abs_difference": _round(difference),
        "within_0_02": difference is not None and difference <= TOLERANCE,
        "federated_eval_loss": _round(final.get("eval_loss")),
        "pooled_site_weighted_loss": _round(metrics["site_weighted"].get("loss")),
        "validation_fatal": sum(p["fatal"] for p in prepared),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 5, 10], help="site counts (each 2 to 26)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the synthetic sites")
    parser.add_argument("--study", type=Path, default=DEFAULT_STUDY, help="study file (model and [training])")
    parser.add_argument("--persons", type=int, default=6000,
                        help="mean persons per site (total sites * persons, split in the synthetic default spread)")
    parser.add_argument("--verbose", action="store_true", help="keep Flower's INFO logs on stderr")
    parser.add_argument("--repeats", type=int, default=1,
                        help="repeats per site count (seeds seed, seed+1, ...): with 2 or more, the Wilcoxon "
                             "rank-sum test of federated against pooled AUC and the paired difference's 95%% CI")
    parser.add_argument("--plot", type=Path, default=None, help="box plot PNG of the repeats (with --repeats >= 2)")
    parser.add_argument("--image-share", type=float, default=None,
                        help="share of target persons with a linked MR slice (default: 0.9 for an image model "
                             "such as bench/densenet_study.toml, else 0: no images)")
    args = parser.parse_args()
    if any(k < 2 or k > 100 for k in args.sites):
        parser.error("--sites: every site count must be between 2 and 100")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.persons < 1 or args.seed < 0:
        parser.error("--persons must be positive and --seed non-negative")
    study_path = args.study.resolve()
    if not study_path.is_file():
        parser.error(f"--study: no such file {study_path}")
    if not args.verbose:
        # Flower's logger sets itself to DEBUG when Flower is first imported: import it (through
        # omopfl.federation, the only package that imports Flower) before quieting it.
        import omopfl.federation.local  # noqa: F401

        logging.getLogger("flwr").setLevel(logging.WARNING)

    import torch

    # One thread: a logistic model on batches of a few dozen rows gains nothing from a second one, and on
    # a busy 2-core machine torch's thread pool makes the timings (not the figures) swing several-fold.
    torch.set_num_threads(1)
    from omopfl.models import IMAGE_KINDS
    from omopfl.study import load_study

    spec = load_study(study_path)
    image_share = args.image_share if args.image_share is not None else (0.9 if spec.model.kind in IMAGE_KINDS else 0.0)
    if not 0.0 <= image_share <= 1.0:
        parser.error("--image-share must be between 0 and 1")
    saved = {key: os.environ.get(key) for key in CACHE_ENV}
    results = []
    repeats: dict[int, list[dict[str, Any]]] = {}
    try:
        for n_sites in args.sites:
            for r in range(args.repeats):
                one = run_one(n_sites, args.persons, args.seed + r, study_path, image_share)
                repeats.setdefault(n_sites, []).append(one)
            results.append(repeats[n_sites][0])
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _log("removed the temporary folders")
    t = spec.training
    out = {
        "benchmark": "federated AUC (n-weighted mean of site test AUCs) vs pooled baseline on synthetic DuckDB sites",
        "study": str(study_path.relative_to(ROOT) if study_path.is_relative_to(ROOT) else study_path),
        "study_hash": spec.hash,
        "model": spec.model.kind,
        "training": {"strategy": t.strategy, "rounds": t.rounds, "local_epochs": t.local_epochs,
                     "pooled_epochs": t.rounds * t.local_epochs, "batch_size": t.batch_size,
                     "learning_rate": t.learning_rate, "test_fraction": t.test_fraction, "seed": t.seed},
        "seed": args.seed,
        "persons_per_site_mean": args.persons,
        "image_share": image_share,
        "tolerance": TOLERANCE,
        "results": results,
        "all_within_0_02": all(r["within_0_02"] for r in results),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
    }
    if args.repeats > 1:
        from omopfl.run_comparison import box_plot, compare_runs

        pairs = {n: ([r["federated_auc"] for r in runs], [r["pooled_site_weighted_auc"] for r in runs])
                 for n, runs in repeats.items()}
        out["repeated"] = {
            "repeats": args.repeats, "seeds": [args.seed + r for r in range(args.repeats)],
            "metric": "AUC (federated: n-weighted site test AUCs; pooled: site-weighted, same test rows)",
            "by_sites": {str(n): {"federated_auc": fed, "pooled_site_weighted_auc": cen, **compare_runs(fed, cen)}
                         for n, (fed, cen) in pairs.items()},
        }
        if args.plot is not None:
            out["repeated"]["plot"] = str(box_plot({f"{n} sites": v for n, v in pairs.items()}, args.plot))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    code = main()
    # Leave without the interpreter teardown, as the omopfl command does: DuckDB's binding otherwise
    # prints pages of harmless "nanobind: leaked ..." lines once Great Expectations has been imported.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
