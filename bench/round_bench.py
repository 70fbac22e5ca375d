"""Per-round framework overhead of federated training, in process and on a loopback deployment; prints JSON.

Setup: three synthetic DuckDB sites (:func:`omopfl.synth.run_synth`, ``--persons`` in all, no images
or omics) prepared for the t2dm_hf example study, then the same training (``--rounds`` rounds of
FedAvg, logistic model unless ``--model``) run by several engines:

``inprocess``
    :class:`omopfl.federation.local.InProcessGrid`: the ServerApp and the sites' ClientApps in this
    process, every message through Flower's protobuf serialisation (the "simulation").
``deployment_stock``
    Flower's defaults: SuperLink + one ``omopfl train --site`` SuperNode per site with
    ``--stock-polling --no-worker`` (3 s idle sleep, 1 s SuperExec poll, a new ``flwr-clientapp``
    process per message that imports torch and loads the data), the ServerApp waiting 3 s between
    pulls and sending separate ``evaluate`` messages each round.
``deployment_server_tuned``
    stock SuperNodes; the ServerApp pulls replies in a tight loop and evaluation rides on the
    ``train`` message.
``deployment_tuned``
    everything omopfl does by default: also the SuperNode's shorter polling, a 0.05 s SuperExec poll
    and the long-lived worker (no torch import or data load per message).

For each engine: wall seconds of each round (from ``metrics.json``; for rounds with a separate
evaluation the evaluation is part of the round), the local compute of a round measured directly
(each site's ``train`` handler and evaluation, run warm in this process: the sites run in parallel
in a deployment, so a round's compute is the slowest site's; in process they run one after the
other, so it is their sum), and overhead = wall - compute (median over rounds 2..R: round 1 pays
for process and import warm-up in every engine).  Bytes: Flower's protobuf size of the message
contents sent and received per round against the model's size (float32 weights).

Usage::

    .venv/bin/python bench/round_bench.py [--rounds 5] [--persons 3000] [--engines inprocess deployment_tuned]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("inprocess", "deployment_stock", "deployment_server_tuned", "deployment_tuned")
SITES = ("site_a", "site_b", "site_c")


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _setup(base: Path, persons: int, model: str) -> tuple[Path, list[Path], Path]:
    from omopfl import policy
    from omopfl.config import load_site
    from omopfl.db import make_engine
    from omopfl.prepare import prepare_site
    from omopfl.study import load_study
    from omopfl.synth import run_synth

    text = (ROOT / "examples" / "t2dm_hf" / "study.toml").read_text()
    text = text.replace('"../../cohorts/', f'"{ROOT}/cohorts/').replace("enabled = true", "enabled = false")
    text = text.replace('kind = "logistic"', f'kind = "{model}"')
    (base / "study.toml").write_text(text)
    study = load_study(base / "study.toml")
    run_synth(base / "synth", n_sites=3, persons=persons, seed=5, image_share=0.0, omics_share=0.0, progress=False)
    adapters = [base / "synth" / "adapters" / f"{name}.toml" for name in SITES]
    for adapter in adapters:
        site = load_site(adapter)
        engine = make_engine(site.database_url())
        try:
            prepare_site(engine, site, study, base / "prepared")
        finally:
            engine.dispose()
        policy.approve(site, study)  # each site approves the study (omopfl sites approve)
    return base / "study.toml", adapters, base / "prepared"


def _local_compute(run_dir: Path, adapters: list[Path], prepared: Path, config: dict[str, Any]) -> dict[str, float]:
    """Seconds of one round's site work (train + evaluation of the received weights), per site, warm."""
    import numpy as np
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

    from omopfl.federation.site.training import site_evaluate, site_train
    from omopfl.models import build_model
    from omopfl.study import ModelSpec

    with np.load(run_dir / "model.npz") as saved:
        state = {k: saved[k] for k in saved.files}
    spec_config = {k: config[k] for k in ("model-kind", "model-hidden", "model-dropout", "test-fraction", "seed")}
    train_config = {**spec_config, "local-epochs": config["local-epochs"], "batch-size": config["batch-size"],
                    "learning-rate": config["learning-rate"], "server-round": 2, "evaluate-received": True}
    seconds = {}
    for adapter in adapters:
        context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                          node_config={"site-config": str(adapter), "prepared-dir": str(prepared)})
        n_features = len(json.loads((run_dir / "features.json").read_text())["feature_names"])
        model = build_model(ModelSpec(kind=config["model-kind"]), n_features)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord(train_config)})
        site_train(content, context)  # warm: cache, imports
        site_evaluate(RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord(spec_config)}),
                      context)
        t0 = time.perf_counter()
        for _ in range(3):
            site_train(content, context)
        seconds[adapter.stem] = (time.perf_counter() - t0) / 3
    return seconds


def _run(engine: str, study: Path, adapters: list[Path], prepared: Path, out: Path, rounds: int) -> dict[str, Any]:
    from omopfl.federation.local import run_training

    kwargs: dict[str, Any] = {"mode": "inprocess" if engine == "inprocess" else "deployment", "timeout": 1800}
    if engine == "deployment_stock":
        kwargs.update(tuned=False, evaluate_on_train=False,
                      extra_run_config={"poll-interval": 3.0, "tune-pulls": False})
    elif engine == "deployment_server_tuned":
        kwargs.update(tuned=False, extra_run_config={"tune-pulls": False})
    t0 = time.perf_counter()
    manifest = run_training(study, adapters, prepared, out_dir=out, rounds=rounds, **kwargs)
    rows = json.loads((out / "metrics.json").read_text())["rounds"]
    return {"manifest": manifest, "rows": rows, "seconds": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--persons", type=int, default=3000, help="persons over the three sites")
    parser.add_argument("--model", default="logistic", choices=("logistic", "mlp"))
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    base = Path(tempfile.mkdtemp(prefix="omopfl-round-bench-"))
    cache = Path(tempfile.mkdtemp(prefix="omopfl-round-bench-cache-"))
    os.environ["OMOPFL_CACHE_DIR"] = str(cache)
    try:
        _log("setting up three synthetic sites ...")
        study, adapters, prepared = _setup(base, args.persons, args.model)
        from omopfl.federation.run_config import training_run_config
        from omopfl.study import load_study

        config = training_run_config(load_study(study), base, min_sites=3)
        results: dict[str, Any] = {}
        compute: dict[str, float] | None = None
        for engine in args.engines:
            _log(f"{engine}: {args.rounds} rounds ...")
            run = _run(engine, study, adapters, prepared, base / f"run_{engine}", args.rounds)
            if compute is None:
                compute = _local_compute(base / f"run_{engine}", adapters, prepared, config)
            parallel = max(compute.values())
            serial = sum(compute.values())
            local = serial if engine == "inprocess" else parallel
            walls = [float(r["seconds"]) for r in run["rows"]]
            later = walls[1:] or walls
            manifest = run["manifest"]
            model_bytes = int(manifest["bytes"]["model"])
            sent = [int(r["bytes_sent"]) for r in run["rows"]]
            received = [int(r["bytes_received"]) for r in run["rows"]]
            results[engine] = {
                "round_seconds": walls,
                "final_evaluation_seconds": run["rows"][-1].get("final_evaluation_seconds"),
                "local_compute_seconds": round(local, 4),
                "overhead_seconds_median": round(statistics.median(later) - local, 3),
                "overhead_seconds_first_round": round(walls[0] - local, 3),
                "stats_phase_seconds": manifest["seconds"]["stats"],
                "run_seconds": round(run["seconds"], 2),
                "bytes_sent_per_round_median": int(statistics.median(sent[1:] or sent)),
                "bytes_received_per_round_median": int(statistics.median(received[1:] or received)),
                "model_bytes": model_bytes,
                "sent_over_model_per_site": round(statistics.median(sent[1:] or sent) / (3 * model_bytes), 3),
                "final_auc": manifest["final"]["eval_auc"],
            }
            _log(f"  rounds {walls}, overhead {results[engine]['overhead_seconds_median']} s")
        out = {"bench": "round_bench", "python": platform.python_version(), "cpus": os.cpu_count(),
               "rounds": args.rounds, "persons": args.persons, "model": args.model, "sites": len(SITES),
               "local_compute_per_site_seconds": {k: round(v, 4) for k, v in (compute or {}).items()},
               "engines": results}
        print(json.dumps(out, indent=2))
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
