"""Benchmark of the synthetic generator writing into PostgreSQL; prints JSON.

Each size runs in a fresh subprocess (one site, no images or omics), so the peak
resident memory (``ru_maxrss``) of one size is not inflated by another.  A second
subprocess per size runs under ``tracemalloc`` for the peak of traced allocations
(numpy and pandas buffers included); its elapsed time is not used for the rate.

Usage::

    bash scripts/with-postgres.sh .venv/bin/python bench/synth_bench.py --persons 100000
    .venv/bin/python bench/synth_bench.py --url postgresql://... --persons 100000 --sizes 20000,100000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path


def _one_run(url: str, persons: int, chunk_size: int, trace: bool) -> dict:
    from omopfl.synth import run_synth

    if trace:
        tracemalloc.start()
    with tempfile.TemporaryDirectory(prefix="omopfl-bench-") as out:
        started = time.perf_counter()
        summaries = run_synth(Path(out), n_sites=1, persons=[persons], seed=7, pg_url=url, image_share=0.0,
                              omics_share=0.0, progress=False, chunk_size=chunk_size)
        elapsed = time.perf_counter() - started
    result = {
        "persons": persons,
        "elapsed_s": round(elapsed, 2),
        "persons_per_s": round(persons / elapsed, 1),
        "rows_written": sum(summaries[0].rows.values()),
        "rows_per_s": round(sum(summaries[0].rows.values()) / elapsed, 1),
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if trace:
        result["tracemalloc_peak_mb"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
        tracemalloc.stop()
    return result


def _subprocess(url: str, persons: int, chunk_size: int, trace: bool) -> dict:
    command = [sys.executable, __file__, "--child", "--persons", str(persons), "--chunk-size", str(chunk_size)]
    if trace:
        command.append("--trace")
    env = dict(os.environ, OMOPFL_BENCH_URL=url)  # the URL never goes on a command line
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"benchmark run failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="PostgreSQL URL (default: $OMOPFL_TEST_PG_URL)")
    parser.add_argument("--persons", type=int, default=100_000, help="persons of the timed run")
    parser.add_argument("--sizes", default="20000,100000", help="sizes whose memory is compared")
    parser.add_argument("--chunk-size", type=int, default=25_000)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(_one_run(os.environ["OMOPFL_BENCH_URL"], args.persons, args.chunk_size, args.trace)))
        return
    url = args.url or os.environ.get("OMOPFL_TEST_PG_URL", "")
    if not url:
        raise SystemExit("set OMOPFL_TEST_PG_URL or pass --url (scripts/with-postgres.sh starts a server)")
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()} | {args.persons})
    timed = _subprocess(url, args.persons, args.chunk_size, trace=False)
    memory = []
    for size in sizes:
        plain = timed if size == args.persons else _subprocess(url, size, args.chunk_size, trace=False)
        traced = _subprocess(url, size, args.chunk_size, trace=True)
        memory.append({"persons": size, "max_rss_mb": plain["max_rss_mb"],
                       "tracemalloc_peak_mb": traced["tracemalloc_peak_mb"], "elapsed_s": plain["elapsed_s"]})
    print(json.dumps({
        "benchmark": "omopfl.synth.run_synth into PostgreSQL (1 site, image_share=0, omics_share=0)",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "chunk_size": args.chunk_size,
        "timed_run": timed,
        "memory_by_size": memory,
    }, indent=2))


if __name__ == "__main__":
    main()
