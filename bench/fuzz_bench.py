"""Long fuzz run of omopfl's parsers (adapter, study, cohort JSON, cohort YAML); prints JSON.

The same targets as tests/test_fuzz.py (which runs a bounded number in CI), for many more examples:
each input must give a parsed object or omopfl's own one-line error.  A failure is printed with the
smallest input Hypothesis found and the exit status is 1.

    .venv/bin/python bench/fuzz_bench.py [--examples 5000] [--target study] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fuzzing import TARGETS
from hypothesis import HealthCheck, given, seed, settings


def run_target(name: str, examples: int, random_seed: int) -> dict:
    strategy, check = TARGETS[name]
    outcomes: Counter[str] = Counter()

    @seed(random_seed)
    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(value) -> None:
        outcomes[check(value)] += 1

    started = time.perf_counter()
    failure = None
    try:
        run()
    except Exception as exc:  # a parser raised something other than OmopflError
        failure = {"type": type(exc).__name__, "message": str(exc)[:500],
                   "traceback": traceback.format_exc(limit=-6)[-3000:]}
    seconds = time.perf_counter() - started
    return {"target": name, "examples": sum(outcomes.values()), "parsed": outcomes["parsed"],
            "refused": outcomes["refused"], "seconds": round(seconds, 2),
            "examples_per_second": round(sum(outcomes.values()) / seconds, 1) if seconds else None,
            "failure": failure}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=5000, help="examples per target")
    parser.add_argument("--target", choices=sorted(TARGETS), action="append", help="default: all")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    results = [run_target(name, args.examples, args.seed) for name in (args.target or sorted(TARGETS))]
    print(json.dumps({"bench": "fuzz", "seed": args.seed, "results": results}, indent=2))
    return 1 if any(r["failure"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
