"""Benchmark of building a multi-criteria cohort in PostgreSQL against its SQL floor; prints JSON.

Two synthetic sites are generated with :func:`omopfl.synth.run_synth` (one site each, no images
or omics), each in its own throwaway database (``CREATE DATABASE`` on the admin URL: both would
otherwise be ``site_a_cdm``/``site_a_results``).  For each size a fresh subprocess then measures:

* ``build_cohorts`` (``replace=True``, translator ``duckcdm``): the cold first call (empty SQL
  cache, so translation is included) and the median of ``--repeats`` warm calls;
* the floor: the very statements ``render_sql`` returns, run on a bare psycopg2 connection in
  one transaction with the same ``SET LOCAL`` settings, median of ``--repeats``;
  (``enable_nestloop = off`` and ``jit = off``, as ``build_cohorts`` sets them);
* a diagnostic floor with the server's JIT left on (``enable_nestloop = off`` inflates plan
  costs past ``jit_above_cost``, so PostgreSQL JIT-compiles statements that run in milliseconds;
  reported as ``diagnostic_floor_server_jit_seconds_median``);
* client memory of the build: the ``tracemalloc`` peak of one extra warm build and the
  ``ru_maxrss`` growth across the builds, so small and big sites can be compared.

Progress goes to stderr; one JSON object goes to stdout.  Everything created (databases,
temporary folders, the SQL cache) is removed at the end.

Usage::

    bash scripts/with-postgres.sh .venv/bin/python bench/cohort_bench.py
    .venv/bin/python bench/cohort_bench.py --url postgresql://... --persons 100000 --small-persons 20000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_COHORT = ROOT / "cohorts" / "t2dm_metformin_new_users.yaml"
URL_ENV = {"small": "OMOPFL_COHORT_BENCH_SMALL_URL", "big": "OMOPFL_COHORT_BENCH_BIG_URL"}
SEED = 7


def _log(message: str) -> None:
    print(f"[cohort_bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _psycopg2_kwargs(url: str) -> dict:
    import sqlalchemy as sa

    parsed = sa.engine.make_url(url)
    kwargs = parsed.translate_connect_args(username="user", database="dbname")
    kwargs.update(parsed.query)
    return kwargs


def _maxrss_mb() -> float:
    """``ru_maxrss`` in MiB.

    On Linux this is inherited through fork + exec: a child starts with its parent's resident size
    at fork time as its "peak", so a delta in the child can read 0 while the child stays below it.
    :func:`_build_peak` is the reliable per-build figure.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _proc_status_mb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _build_peak(call):
    """Run ``call`` and return (its result, peak resident-size growth in MiB or None).

    Resets the process's high-water mark first (``/proc/self/clear_refs``, Linux 4.0+), then reads
    ``VmHWM`` against ``VmRSS`` before the call.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _proc_status_mb("VmRSS")
    except OSError:
        before = None
    result = call()
    peak = _proc_status_mb("VmHWM")
    return result, (round(peak - before, 1) if before is not None and peak is not None else None)


# --------------------------------------------------------------------------- child: one size
def _floor(connection, statements: list[str], timeout_ms: int, jit: bool = True) -> tuple[float, list[float]]:
    """Run the translated statements in one transaction on a bare psycopg2 connection.

    ``jit=False`` matches ``build_cohorts``; ``jit=True`` is the diagnostic variant with the server's JIT.
    """
    per_statement = []
    started = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_nestloop = off")
        cursor.execute(f"SET LOCAL statement_timeout = {int(timeout_ms)}")
        if not jit:
            cursor.execute("SET LOCAL jit = off")
        for statement in statements:
            t = time.perf_counter()
            cursor.execute(statement)
            per_statement.append(time.perf_counter() - t)
    connection.commit()
    return time.perf_counter() - started, per_statement


def _child(adapter: Path, cohort: Path, repeats: int) -> dict:
    import psycopg2

    from omopfl.cohort import STATEMENT_TIMEOUT_MS, assign_ids, build_cohorts, load_definition, render_sql
    from omopfl.config import load_site
    from omopfl.db import site_engine

    site = load_site(adapter)
    engine = site_engine(site)
    definition = load_definition(cohort)
    requests = assign_ids([definition], None)
    cohort_id = requests[0][1]

    def build():
        started = time.perf_counter()
        result = build_cohorts(engine, site, requests, replace=True, translator="duckcdm")[0]
        return time.perf_counter() - started, result

    rss_start = _maxrss_mb()
    # the SQL cache is empty (fresh OMOPFL_CACHE_DIR): the first call includes translation
    (cold_seconds, cold), cold_rss_growth = _build_peak(build)
    rss_after_cold = _maxrss_mb()
    _log(f"{site.name}: cold build {cold_seconds:.2f} s, {cold.person_count} persons, {cold.statements} statements")

    statements = render_sql(definition, engine.dialect.name, site.cdm_schema, site.vocabulary_schema,
                            site.results_schema, cohort_id, "duckcdm")
    connection = psycopg2.connect(**_psycopg2_kwargs(site.database_url()))
    builds, floors, floor_statements, inner, floors_no_jit, rss_growth = [], [], [], [], [], []
    try:
        with connection.cursor() as cursor:
            cursor.execute("SHOW server_version")
            server_version = cursor.fetchone()[0]
            cursor.execute("SELECT current_setting('jit'), current_setting('jit_above_cost'), pg_jit_available()")
            jit_setting = dict(zip(("jit", "jit_above_cost", "jit_available"), cursor.fetchone(), strict=True))
        connection.commit()
        for i in range(repeats):  # interleaved, so drift (autovacuum, caches) hits both alike
            (seconds, result), growth = _build_peak(build)
            builds.append(seconds)
            rss_growth.append(growth)
            inner.append(result.seconds)
            seconds, per_statement = _floor(connection, statements, STATEMENT_TIMEOUT_MS, jit=False)
            floors.append(seconds)
            floor_statements.append(per_statement)
            floors_no_jit.append(_floor(connection, statements, STATEMENT_TIMEOUT_MS, jit=True)[0])
            _log(f"{site.name}: repeat {i + 1}/{repeats}: build {builds[-1]:.3f} s "
                 f"(statements part {result.seconds:.3f} s), floor {seconds:.3f} s, "
                 f"floor with the server's jit {floors_no_jit[-1]:.3f} s")
    finally:
        connection.close()
    rss_after_warm = _maxrss_mb()

    tracemalloc.start()
    traced_started = time.perf_counter()
    _, traced = build()
    traced_seconds = time.perf_counter() - traced_started
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    median_per_statement = [statistics.median(s) for s in zip(*floor_statements, strict=True)]
    slowest = sorted(range(len(statements)), key=lambda k: median_per_statement[k], reverse=True)[:3]
    build_median = statistics.median(builds)
    floor_median = statistics.median(floors)
    engine.dispose()
    return {
        "cohort": definition.name,
        "definition_hash": definition.hash,
        "cohort_persons": cold.person_count,
        "cohort_records": cold.record_count,
        "statements": len(statements),
        "warnings": cold.warnings,
        "build_seconds_cold": round(cold_seconds, 3),
        "build_seconds_median": round(build_median, 3),
        "build_seconds_all": [round(s, 3) for s in builds],
        "build_statements_part_seconds_median": round(statistics.median(inner), 3),
        "floor_seconds_median": round(floor_median, 3),
        "floor_seconds_all": [round(s, 3) for s in floors],
        "ratio": round(build_median / floor_median, 3) if floor_median else None,
        "overhead_seconds": round(build_median - floor_median, 3),
        "diagnostic_floor_server_jit_seconds_median": round(statistics.median(floors_no_jit), 3),
        "floor_slowest_statements": [
            {"index": k, "seconds": round(median_per_statement[k], 3), "sql": " ".join(statements[k].split())[:90]}
            for k in slowest
        ],
        "tracemalloc_peak_mb": round(traced_peak / 2**20, 3),
        "traced_build_seconds": round(traced_seconds, 3),
        "traced_build_persons": traced.person_count,
        "rss_peak_growth_mb_warm_max": max(rss_growth) if None not in rss_growth else None,
        "rss_peak_growth_mb_cold": cold_rss_growth,
        "maxrss_start_mb": round(rss_start, 1),
        "maxrss_delta_mb": round(rss_after_warm - rss_start, 1),
        "maxrss_delta_warm_mb": round(rss_after_warm - rss_after_cold, 1),
        "postgres_version": server_version,
        "server_jit": jit_setting,
    }


def _measure(adapter: Path, cohort: Path, repeats: int, cache_dir: Path) -> dict:
    command = [sys.executable, __file__, "--child", "--adapter", str(adapter), "--cohort", str(cohort),
               "--repeats", str(repeats)]
    env = dict(os.environ, OMOPFL_CACHE_DIR=str(cache_dir))  # URLs travel in the environment only
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=None, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {adapter.stem} failed (exit {done.returncode}); see stderr above")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- parent
def _admin(url: str):
    import psycopg2

    connection = psycopg2.connect(**_psycopg2_kwargs(url))
    connection.autocommit = True
    return connection


def _synth(url: str, label: str, persons: int, out: Path) -> tuple[Path, dict]:
    from omopfl.synth import run_synth

    os.environ[URL_ENV[label]] = url
    adapters = out / "adapters"
    started = time.perf_counter()
    summary = run_synth(out / "sites", n_sites=1, persons=[persons], seed=SEED, pg_url_env=URL_ENV[label],
                        image_share=0.0, omics_share=0.0, adapters_dir=adapters, progress=False)[0]
    seconds = time.perf_counter() - started
    if summary.backend != "postgresql":
        raise RuntimeError("run_synth did not write to PostgreSQL")
    rows = summary.rows
    _log(f"{label}: {persons} persons generated in {seconds:.1f} s ({sum(rows.values())} rows)")
    return Path(summary.adapter), {
        "synth_seconds": round(seconds, 1),
        "cdm_rows": sum(rows.values()),
        "drug_exposure_rows": rows.get("drug_exposure", 0),
        "condition_occurrence_rows": rows.get("condition_occurrence", 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="PostgreSQL admin URL (default: $OMOPFL_TEST_PG_URL)")
    parser.add_argument("--persons", type=int, default=100_000, help="persons of the big site")
    parser.add_argument("--small-persons", type=int, default=20_000, help="persons of the small site")
    parser.add_argument("--repeats", type=int, default=3, help="warm builds and floor runs per size")
    parser.add_argument("--cohort", type=Path, default=DEFAULT_COHORT, help="cohort definition file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--adapter", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")

    if args.child:
        print(json.dumps(_child(args.adapter, args.cohort, args.repeats)))
        return

    url = args.url or os.environ.get("OMOPFL_TEST_PG_URL", "")
    if not url:
        raise SystemExit("set OMOPFL_TEST_PG_URL or pass --url (scripts/with-postgres.sh starts a server)")
    import sqlalchemy as sa

    from omopfl.cohort import load_definition

    definition = load_definition(args.cohort)
    sizes = {"small": args.small_persons, "big": args.persons}
    databases = {label: f"omopfl_cohort_bench_{label}_{os.getpid()}" for label in sizes}
    admin = _admin(url)
    measured: dict[str, dict] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="omopfl-cohort-bench-") as tmp:
            for label, persons in sizes.items():  # small first; each size has its own database
                with admin.cursor() as cursor:
                    cursor.execute(f'CREATE DATABASE "{databases[label]}"')
                site_url = sa.engine.make_url(url).set(database=databases[label]).render_as_string(
                    hide_password=False)
                adapter, data = _synth(site_url, label, persons, Path(tmp) / label)
                _log(f"{label}: measuring ({args.repeats} repeats)")
                data.update(_measure(adapter, args.cohort.resolve(), args.repeats, Path(tmp) / label / "cache"))
                measured[label] = {"persons": persons, **data}
    finally:
        with admin.cursor() as cursor:
            for name in databases.values():
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
        _log("dropped the benchmark databases")

    big, small = measured["big"], measured["small"]
    version = big.pop("postgres_version")
    small.pop("postgres_version")
    if small["definition_hash"] != big["definition_hash"]:
        _log("warning: the cohort file changed between the two measurements")
    name = big.pop("cohort")
    small.pop("cohort")
    small_peak = small["tracemalloc_peak_mb"]
    print(json.dumps({
        "benchmark": "omopfl.cohort.build_cohorts on PostgreSQL vs the translated SQL run on bare psycopg2",
        "cohort": name,
        "cohort_file": str(args.cohort),
        "inclusion_rules": len(definition.inclusion_rules),
        "repeats": args.repeats,
        **big,
        "small": small,
        "client_memory_growth_ratio": round(big["tracemalloc_peak_mb"] / small_peak, 3) if small_peak else None,
        "persons_ratio": round(big["persons"] / small["persons"], 3),
        "postgres_version": version,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
    }, indent=2))


if __name__ == "__main__":
    main()
