"""Benchmark of site preparation: feature streaming vs COPY, DICOM decode and cache, load_prepared; prints JSON.

Three parts, each on a synthetic site from :func:`omopfl.synth.run_synth` (one site, seed 7):

1. **Features on PostgreSQL** (``--persons``, no images or omics), in a throwaway database
   (``CREATE DATABASE`` on the admin URL).  The study's cohorts are built with
   :func:`omopfl.prepare.ensure_cohorts` and the database is ``VACUUM (ANALYZE)``-ed (fresh
   statistics, and no autovacuum of the bulk load competing with the timings); then, after one
   untimed warm-up of each, interleaved over ``--repeats``:

   * ``stream_features`` with the default chunk size, every chunk concatenated into the
     feature matrix (rows/second);
   * the floor: ``COPY (<feature_query(..., literal=True)>) TO STDOUT`` through psycopg2
     ``copy_expert`` into a sink that only counts rows (rows/second), on its own connection
     with the same server settings;
   * their ratio.

   Then the client memory of streaming (chunks consumed and dropped), each run in a fresh
   subprocess: the resident-size growth of one run and the ``tracemalloc`` peak of another, for
   each of ``--chunk-sizes`` (a small one, ..., the default) and two table sizes (the whole target
   cohort and a copy of its first fifth under another cohort id), beside the size of the whole
   feature matrix: at a fixed chunk size the peak should not move with the table size.
   Diagnostics, also per repeat, say where the time goes: the COPY with
   ``max_parallel_workers_per_gather = 0`` (a cursor never gets a parallel plan), one streamed run
   taken apart (server-side cursor fetches alone on bare psycopg2, then the conversion of the rows
   into frames), and the plans of the query as a plain SELECT and as ``DECLARE ... CURSOR``.
   The plans (not run) of the subset cohort's query before and after ``ANALYZE`` of the cohort
   table show what a cohort id the statistics do not know yet does to the planner.

2. **DICOM on DuckDB** (``--image-persons``, ``image_share=1``): per repeat a fresh cache folder;
   ``link_images`` (CDM query + header checks) and a first pass over every linked image (decode,
   resize, normalize, cache write), then a new ``link_images`` on the same cache folder and a
   second pass that only reads the cache: images/second of both and the speed-up.

3. **load_prepared**: ``prepare_site`` of that DuckDB site with the study into a temporary folder,
   then ``load_prepared`` timed (median of ``max(--repeats, 5)`` runs; ``images.npy`` is memory-mapped, so a
   second figure also touches every array).

Progress goes to stderr; one JSON object goes to stdout.  Everything created (the database,
temporary folders, the cohort SQL cache and the image caches) is removed at the end.

Usage::

    bash scripts/with-postgres.sh .venv/bin/python bench/prepare_bench.py
    .venv/bin/python bench/prepare_bench.py --url postgresql://... --persons 100000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STUDY = ROOT / "examples" / "t2dm_hf" / "study.toml"
URL_ENV = "OMOPFL_PREPARE_BENCH_URL"
SEED = 7
SUBSET_COHORT_ID = 990_001  # the first fifth of the target cohort (memory comparison)


def _log(message: str) -> None:
    print(f"[prepare_bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _psycopg2_kwargs(url: str) -> dict:
    import sqlalchemy as sa

    parsed = sa.engine.make_url(url)
    kwargs = parsed.translate_connect_args(username="user", database="dbname")
    kwargs.update(parsed.query)
    return kwargs


def _proc_status_mb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _rss_peak_growth(call: Callable[[], Any]) -> tuple[Any, float | None]:
    """Run ``call``; return (its result, peak resident-size growth in MiB, or None off Linux).

    Resets the high-water mark (``/proc/self/clear_refs``), then compares ``VmHWM`` with ``VmRSS``
    before the call.  Unlike ``tracemalloc`` this also sees libpq's result buffers.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _proc_status_mb("VmRSS")
    except OSError:
        before = None
    result = call()
    peak = _proc_status_mb("VmHWM")
    return result, (round(peak - before, 1) if before is not None and peak is not None else None)


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _rate(count: int, seconds: float) -> float | None:
    return round(count / seconds, 1) if seconds > 0 else None


class _CountingSink:
    """A file-like sink for ``copy_expert``: counts bytes and rows (text COPY: one line per row), keeps nothing."""

    def __init__(self) -> None:
        self.bytes = 0
        self.rows = 0

    def write(self, data: bytes | str) -> int:
        self.bytes += len(data)
        self.rows += data.count(b"\n" if isinstance(data, bytes) else "\n")
        return len(data)


# --------------------------------------------------------------------------- part 1: PostgreSQL
def _admin(url: str):
    import psycopg2

    connection = psycopg2.connect(**_psycopg2_kwargs(url))
    connection.autocommit = True
    return connection


def _synth_pg(site_url: str, persons: int, out: Path) -> tuple[Path, dict]:
    from omopfl.synth import run_synth

    os.environ[URL_ENV] = site_url
    started = time.perf_counter()
    summary = run_synth(out / "sites", n_sites=1, persons=[persons], seed=SEED, pg_url_env=URL_ENV,
                        image_share=0.0, omics_share=0.0, adapters_dir=out / "adapters", progress=False)[0]
    seconds = time.perf_counter() - started
    if summary.backend != "postgresql":
        raise RuntimeError("run_synth did not write to PostgreSQL")
    _log(f"postgresql: {persons} persons generated in {seconds:.1f} s ({sum(summary.rows.values())} rows)")
    return Path(summary.adapter), {"synth_seconds": round(seconds, 1), "cdm_rows": sum(summary.rows.values()),
                                   "measurement_rows": summary.rows.get("measurement", 0),
                                   "target_persons_truth": summary.target_persons}


def _stream_into_matrix(engine, site, study, target_id: int, outcome_id: int, chunk_rows: int):
    import pandas as pd

    from omopfl.features import stream_features

    with engine.connect() as conn:
        chunks = list(stream_features(conn, site, study, target_id, outcome_id, chunk_rows))
    return pd.concat(chunks, ignore_index=True) if len(chunks) > 1 else chunks[0], len(chunks)


def _stream_discarding(engine, site, study, target_id: int, outcome_id: int, chunk_rows: int) -> tuple[int, int]:
    """Stream and drop every chunk: (rows, chunks)."""
    from omopfl.features import stream_features

    rows = chunks = 0
    with engine.connect() as conn:
        for chunk in stream_features(conn, site, study, target_id, outcome_id, chunk_rows):
            rows += len(chunk)
            chunks += 1
            del chunk
    return rows, chunks


def _subset_cohort(connection, site, study, target_id: int, outcome_id: int, persons: int) -> tuple[int, dict]:
    """Copy the target cohort's entries of its first ``persons`` subjects under :data:`SUBSET_COHORT_ID`.

    A smaller feature table on the same database, to compare streaming peaks at one chunk size.
    The new cohort id is unknown to the cohort table's statistics, as after any cohort build: the
    plans of its feature query before and after ``ANALYZE`` of the cohort table are returned (not
    run); the table is then analyzed, so the memory runs get the sound plan.
    """
    from omopfl.db import qualified
    from omopfl.features import feature_query

    cohort = qualified(site.results_schema, "cohort")
    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {cohort} WHERE cohort_definition_id = %(s)s", {"s": SUBSET_COHORT_ID})
        cursor.execute(
            f"INSERT INTO {cohort} (cohort_definition_id, subject_id, cohort_start_date, cohort_end_date) "
            f"SELECT %(s)s, subject_id, cohort_start_date, cohort_end_date FROM {cohort} "
            f"WHERE cohort_definition_id = %(t)s AND subject_id IN (SELECT DISTINCT subject_id FROM {cohort} "
            "WHERE cohort_definition_id = %(t)s ORDER BY subject_id LIMIT %(n)s)",
            {"s": SUBSET_COHORT_ID, "t": target_id, "n": persons})
        cursor.execute(f"SELECT COUNT(DISTINCT subject_id) FROM {cohort} WHERE cohort_definition_id = %(s)s",
                       {"s": SUBSET_COHORT_ID})
        rows = int(cursor.fetchone()[0])
    connection.commit()
    sql, _ = feature_query(site, study, SUBSET_COHORT_ID, outcome_id, literal=True)
    plans = {}
    for label in ("stale_statistics", "after_analyze"):
        if label == "after_analyze":
            with connection.cursor() as cursor:
                cursor.execute(f"ANALYZE {cohort}")
            connection.commit()
        with connection.cursor() as cursor:
            cursor.execute(f"EXPLAIN (FORMAT JSON) {sql}")
            plans[label] = _plan_summary(cursor.fetchone()[0][0]["Plan"])
        connection.rollback()
    return rows, {"cohort_rows": rows, **plans}

def _memory_child(adapter: Path, study_path: Path, target_id: int, outcome_id: int, chunk_rows: int) -> dict:
    """In a fresh process: resident-size growth of one streamed run, then the tracemalloc peak of another."""
    from omopfl.config import load_site
    from omopfl.db import site_engine
    from omopfl.study import load_study

    site = load_site(adapter)
    study = load_study(study_path)
    engine = site_engine(site)
    # Warm-up on an empty cohort (id 0): imports, connection, SQL compilation and the frame code paths
    # are paid before the baseline, so the growth below is the data's.  The pool keeps the connection.
    _stream_discarding(engine, site, study, 0, outcome_id, chunk_rows)
    (rows, chunks), rss_growth = _rss_peak_growth(
        lambda: _stream_discarding(engine, site, study, target_id, outcome_id, chunk_rows))
    tracemalloc.start()
    _stream_discarding(engine, site, study, target_id, outcome_id, chunk_rows)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    engine.dispose()
    return {"rows": rows, "chunks": chunks, "tracemalloc_peak_mb": round(peak / 2**20, 2),
            "rss_peak_growth_mb": rss_growth}


def _memory_subprocess(adapter: Path, study_path: Path, target_id: int, outcome_id: int, chunk_rows: int) -> dict:
    command = [sys.executable, __file__, "--memory-child", "--adapter", str(adapter), "--study", str(study_path),
               "--target-id", str(target_id), "--outcome-id", str(outcome_id), "--chunk-rows", str(chunk_rows)]
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=None, text=True, check=False)  # URL: environment
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement failed (exit {done.returncode}); see stderr above")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _copy_floor(connection, sql: str, settings: tuple[str, ...] = ()) -> tuple[float, _CountingSink]:
    sink = _CountingSink()
    with connection.cursor() as cursor:
        for setting in settings:
            cursor.execute(f"SET LOCAL {setting}")
        started = time.perf_counter()
        cursor.copy_expert(f"COPY ({sql}) TO STDOUT", sink)
    connection.commit()
    return time.perf_counter() - started, sink


def _diagnostic_split(connection, sql: str, columns, chunk_rows: int) -> dict:
    """One streamed run taken apart: named-cursor fetches on bare psycopg2, then row -> frame conversion."""
    from omopfl.features import _frame

    fetch = convert = 0.0
    rows = 0
    started = time.perf_counter()
    with connection.cursor(name="prepare_bench_diag") as cursor:
        cursor.itersize = chunk_rows
        t = time.perf_counter()
        cursor.execute(sql)
        execute = time.perf_counter() - t
        while True:
            t = time.perf_counter()
            batch = cursor.fetchmany(chunk_rows)
            fetch += time.perf_counter() - t
            if not batch:
                break
            rows += len(batch)
            t = time.perf_counter()
            _frame(batch, columns)
            convert += time.perf_counter() - t
    connection.commit()
    return {"rows": rows, "declare_seconds": round(execute, 3), "named_cursor_fetch_seconds": round(fetch, 3),
            "frame_conversion_seconds": round(convert, 3),
            "total_seconds": round(time.perf_counter() - started, 3)}


def _plan_summary(plan: dict) -> dict:
    counts = {"gather_nodes": 0, "nested_loops": 0, "workers_planned": 0}
    stack = [plan]
    while stack:
        node = stack.pop()
        if node.get("Node Type") in {"Gather", "Gather Merge"}:
            counts["gather_nodes"] += 1
            counts["workers_planned"] += int(node.get("Workers Planned", 0))
        counts["nested_loops"] += node.get("Node Type") == "Nested Loop"
        stack.extend(node.get("Plans", []))
    return {"top_node": plan.get("Node Type"), "total_cost": plan.get("Total Cost"),
            "estimated_rows": plan.get("Plan Rows"), **counts}


def _explain_select_vs_cursor(connection, sql: str) -> dict:
    """The plan of the query as COPY/a plain SELECT gets it, and as ``DECLARE ... CURSOR`` (stream_results) gets it.

    PostgreSQL never gives a cursor a parallel plan, and plans it for ``cursor_tuple_fraction`` of the rows.
    """
    out: dict[str, Any] = {}
    with connection.cursor() as cursor:
        cursor.execute("SHOW cursor_tuple_fraction")
        out["cursor_tuple_fraction"] = cursor.fetchone()[0]
        cursor.execute("SHOW max_parallel_workers_per_gather")
        out["max_parallel_workers_per_gather"] = cursor.fetchone()[0]
        for label, prefix in (("plain_select", ""), ("cursor", "DECLARE prepare_bench_explain CURSOR FOR ")):
            cursor.execute(f"EXPLAIN (FORMAT JSON) {prefix}{sql}")
            out[label] = _plan_summary(cursor.fetchone()[0][0]["Plan"])
    connection.rollback()
    return out

def _features_part(url: str, persons: int, repeats: int, chunk_sizes: list[int], study_path: Path,
                   out: Path) -> dict:
    import psycopg2
    import sqlalchemy as sa

    from omopfl.config import load_site
    from omopfl.db import site_engine
    from omopfl.features import DEFAULT_CHUNK_ROWS, feature_columns, feature_query
    from omopfl.prepare import ensure_cohorts
    from omopfl.study import load_study

    database = f"omopfl_prepare_bench_{os.getpid()}"
    admin = _admin(url)
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{database}"')
        site_url = sa.engine.make_url(url).set(database=database).render_as_string(hide_password=False)
        adapter, data = _synth_pg(site_url, persons, out)
        site = load_site(adapter)
        study = load_study(study_path)
        engine = site_engine(site)
        try:
            started = time.perf_counter()
            cohorts = ensure_cohorts(engine, site, study)
            data["cohort_seconds"] = round(time.perf_counter() - started, 2)
            target_id, outcome_id = cohorts["target"]["id"], cohorts["outcome"]["id"]
            _log(f"postgresql: cohorts built in {data['cohort_seconds']} s")
            # Fresh statistics, and no autovacuum/autoanalyze of the bulk load running beside the timings
            started = time.perf_counter()
            vacuum = _admin(site_url)
            try:
                with vacuum.cursor() as cursor:
                    cursor.execute("VACUUM (ANALYZE)")
            finally:
                vacuum.close()
            data["vacuum_analyze_seconds"] = round(time.perf_counter() - started, 2)
            sql, _ = feature_query(site, study, target_id, outcome_id, literal=True)
            columns = feature_columns(study)

            connection = psycopg2.connect(**_psycopg2_kwargs(site_url))
            try:
                with connection.cursor() as cursor:
                    cursor.execute("SHOW server_version")
                    server_version = cursor.fetchone()[0]
                    cursor.execute("SELECT current_setting('jit'), current_setting('work_mem')")
                    jit, work_mem = cursor.fetchone()
                connection.commit()
                # warm-up of both (buffers, catalog caches); not timed
                _, warm_sink = _copy_floor(connection, sql)
                frame, _ = _stream_into_matrix(engine, site, study, target_id, outcome_id, DEFAULT_CHUNK_ROWS)
                if len(frame) != warm_sink.rows:
                    raise RuntimeError(f"stream gave {len(frame)} rows, COPY {warm_sink.rows}")
                rows = len(frame)
                matrix_mb = frame.memory_usage(deep=True).sum() / 2**20
                del frame
                streams, floors, serial_floors, splits, chunk_counts = [], [], [], [], []
                for i in range(repeats):  # interleaved, so drift hits all alike
                    t = time.perf_counter()
                    frame, n_chunks = _stream_into_matrix(engine, site, study, target_id, outcome_id,
                                                          DEFAULT_CHUNK_ROWS)
                    streams.append(time.perf_counter() - t)
                    chunk_counts.append(n_chunks)
                    if len(frame) != rows:
                        raise RuntimeError(f"stream gave {len(frame)} rows, expected {rows}")
                    del frame
                    seconds, sink = _copy_floor(connection, sql)
                    floors.append(seconds)
                    if sink.rows != rows:
                        raise RuntimeError(f"COPY gave {sink.rows} rows, expected {rows}")
                    serial_floors.append(_copy_floor(connection, sql, ("max_parallel_workers_per_gather = 0",))[0])
                    splits.append(_diagnostic_split(connection, sql, columns, DEFAULT_CHUNK_ROWS))
                    _log(f"postgresql: repeat {i + 1}/{repeats}: stream {streams[-1]:.3f} s, COPY {seconds:.3f} s, "
                         f"COPY without parallel workers {serial_floors[-1]:.3f} s, bare named cursor "
                         f"{splits[-1]['named_cursor_fetch_seconds']:.3f} s + frames "
                         f"{splits[-1]['frame_conversion_seconds']:.3f} s ({rows} rows)")
                diagnostic = {key: round(_median([split[key] for split in splits]), 3)
                              for key in splits[0] if key != "rows"}
                plans = _explain_select_vs_cursor(connection, sql)
                subset_rows, new_cohort_plans = _subset_cohort(connection, site, study, target_id, outcome_id,
                                                               max(1, rows // 5))
            finally:
                connection.close()

            memory = []
            for chunk_rows in chunk_sizes:  # each in a fresh process: a clean heap and resident-size baseline
                for cohort_id, table_rows in ((target_id, rows), (SUBSET_COHORT_ID, subset_rows)):
                    measured = _memory_subprocess(adapter, study_path, cohort_id, outcome_id, chunk_rows)
                    if measured["rows"] != table_rows:
                        raise RuntimeError(f"memory run streamed {measured['rows']} rows, expected {table_rows}")
                    memory.append({"chunk_rows": chunk_rows, "table_rows": table_rows, **measured})
                    _log(f"postgresql: chunk {chunk_rows}, table {table_rows} rows: tracemalloc peak "
                         f"{measured['tracemalloc_peak_mb']} MiB, rss growth {measured['rss_peak_growth_mb']} MiB "
                         f"({measured['chunks']} chunks)")
        finally:
            engine.dispose()
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        admin.close()
        os.environ.pop(URL_ENV, None)
        _log("postgresql: dropped the benchmark database")

    stream_median, floor_median = _median(streams), _median(floors)
    return {
        "persons": persons,
        **data,
        "feature_rows": rows,
        "feature_columns": len(columns),
        "feature_matrix_mb": round(matrix_mb, 2),
        "copy_text_mb": round(sink.bytes / 2**20, 2),
        "default_chunk_rows": DEFAULT_CHUNK_ROWS,
        "stream_chunks": chunk_counts[0],
        "stream_seconds_median": round(stream_median, 3),
        "stream_seconds_all": [round(s, 3) for s in streams],
        "stream_rows_per_second": _rate(rows, stream_median),
        "copy_seconds_median": round(floor_median, 3),
        "copy_seconds_all": [round(s, 3) for s in floors],
        "copy_rows_per_second": _rate(rows, floor_median),
        "stream_over_copy_time_ratio": round(stream_median / floor_median, 3) if floor_median else None,
        "streaming_memory": memory,
        "diagnostic_copy_without_parallel_workers_seconds_median": round(_median(serial_floors), 3),
        "diagnostic_copy_without_parallel_workers_seconds_all": [round(s, 3) for s in serial_floors],
        "diagnostic_split_default_chunk_median": diagnostic,
        "diagnostic_plans": plans,
        "diagnostic_new_cohort_plans": new_cohort_plans,
        "postgres_version": server_version,
        "server_settings": {"jit": jit, "work_mem": work_mem},
    }


# --------------------------------------------------------------------------- parts 2 and 3: DuckDB
def _image_pass(engine, site, study, persons, cache: Path):
    from omopfl.linking import link_images

    t0 = time.perf_counter()
    with engine.connect() as conn:
        links = link_images(conn, site, study, persons, cache)
    t1 = time.perf_counter()
    pixels = links.images.materialize()
    t2 = time.perf_counter()
    return links, pixels, t1 - t0, t2 - t1


def _dicom_and_load_part(persons: int, repeats: int, study_path: Path, out: Path) -> tuple[dict, dict]:
    import numpy as np

    from omopfl.config import load_site
    from omopfl.db import site_engine
    from omopfl.features import read_features
    from omopfl.prepare import ensure_cohorts, load_prepared, prepare_site
    from omopfl.study import load_study
    from omopfl.synth import run_synth

    started = time.perf_counter()
    summary = run_synth(out / "sites", n_sites=1, persons=[persons], seed=SEED, image_share=1.0, omics_share=1.0,
                        adapters_dir=out / "adapters", progress=False)[0]
    synth_seconds = time.perf_counter() - started
    if summary.backend != "duckdb":
        raise RuntimeError("run_synth did not write a DuckDB site")
    _log(f"duckdb: {persons} persons generated in {synth_seconds:.1f} s ({summary.linked_images} images)")
    site = load_site(summary.adapter)
    study = load_study(study_path)
    engine = site_engine(site)
    try:
        cohorts = ensure_cohorts(engine, site, study)
        with engine.connect() as conn:
            frame = read_features(conn, site, study, cohorts["target"]["id"], cohorts["outcome"]["id"]).frame
        cohort = frame[["person_id", "index_date"]]

        first_link, first_pass, second_link, second_pass = [], [], [], []
        reports = None
        identical = True
        for i in range(repeats):
            cache = out / f"image_cache_{i}"  # fresh: every image is a miss
            links, pixels, link_s, pass_s = _image_pass(engine, site, study, cohort, cache)
            first_link.append(link_s)
            first_pass.append(pass_s)
            first_report = links.report
            again, cached, link2_s, pass2_s = _image_pass(engine, site, study, cohort, cache)
            second_link.append(link2_s)
            second_pass.append(pass2_s)
            identical = identical and bool(np.array_equal(pixels, cached))
            reports = (first_report, again.report)
            _log(f"duckdb: repeat {i + 1}/{repeats}: {len(links)} images: link {link_s:.2f} s + first pass "
                 f"{pass_s:.2f} s; link {link2_s:.2f} s + cached pass {pass2_s:.3f} s")
        n = len(links)
        first_report, second_report = reports
        first_total = _median([a + b for a, b in zip(first_link, first_pass, strict=True)])
        second_total = _median([a + b for a, b in zip(second_link, second_pass, strict=True)])
        dicom = {
            "persons": persons,
            "synth_seconds": round(synth_seconds, 1),
            "cohort_persons": len(cohort),
            "images": n,
            "image_size": study.imaging.size,
            "source_pixels": "64x64 uint16, explicit VR little endian (synthetic)",
            "first": {
                "link_seconds_median": round(_median(first_link), 3),
                "pass_seconds_median": round(_median(first_pass), 3),
                "total_seconds_median": round(first_total, 3),
                "images_per_second": _rate(n, first_total),
                "pass_only_images_per_second": _rate(n, _median(first_pass)),
                "cache_misses": first_report["cache_misses"],
                "cache_hits": first_report["cache_hits"],
                "decoded": first_report["decoded"],
                "decode_failed": first_report["decode_failed"],
            },
            "second_from_cache": {
                "link_seconds_median": round(_median(second_link), 3),
                "pass_seconds_median": round(_median(second_pass), 4),
                "total_seconds_median": round(second_total, 3),
                "images_per_second": _rate(n, second_total),
                "pass_only_images_per_second": _rate(n, _median(second_pass)),
                "cache_misses": second_report["cache_misses"],
                "cache_hits": second_report["cache_hits"],
            },
            "speedup_total": round(first_total / second_total, 2) if second_total else None,
            "speedup_pass_only": round(_median(first_pass) / _median(second_pass), 2) if _median(second_pass) else None,
            "cached_pixels_identical": identical,
        }

        os.environ["OMOPFL_IMAGE_CACHE"] = str(out / "prepare_image_cache")
        started = time.perf_counter()
        folder, manifest = prepare_site(engine, site, study, out / "prepared")
        prepare_seconds = time.perf_counter() - started
    finally:
        engine.dispose()
    assert folder is not None
    _log(f"duckdb: prepare_site in {prepare_seconds:.1f} s; timing load_prepared")
    loads, touched = [], []
    for _ in range(max(repeats, 5)):
        t = time.perf_counter()
        loaded = load_prepared(folder)
        loads.append(time.perf_counter() - t)
        t = time.perf_counter()
        loaded = load_prepared(folder)
        for array in (loaded.x, loaded.y, loaded.images, loaded.image_mask, loaded.omics):
            if array is not None:
                float(np.asarray(array, dtype=np.float64).sum())
        touched.append(time.perf_counter() - t)
    files = {p.name: round(p.stat().st_size / 2**20, 3) for p in sorted(folder.iterdir()) if p.is_file()}
    load = {
        "prepare_site_seconds": round(prepare_seconds, 2),
        "persons": loaded.n,
        "x_shape": list(loaded.x.shape),
        "images_shape": list(loaded.images.shape) if loaded.images is not None else None,
        "omics_shape": list(loaded.omics.shape) if loaded.omics is not None else None,
        "linked_images": int(loaded.image_mask.sum()) if loaded.image_mask is not None else 0,
        "files_mb": files,
        "load_prepared_runs": len(loads),
        "load_prepared_seconds_median": round(_median(loads), 4),
        "load_prepared_seconds_max": round(max(loads), 4),
        "load_prepared_and_touch_all_arrays_seconds_median": round(_median(touched), 4),
        "manifest_seconds": manifest.get("seconds"),
    }
    return dicom, load


# --------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="PostgreSQL admin URL (default: $OMOPFL_TEST_PG_URL)")
    parser.add_argument("--persons", type=int, default=100_000, help="persons of the PostgreSQL site")
    parser.add_argument("--image-persons", type=int, default=3000, help="persons of the DuckDB site with images")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument("--chunk-sizes", default="1000,10000",
                        help="chunk sizes of the streaming memory measurement (the default chunk size is added)")
    parser.add_argument("--study", type=Path, default=DEFAULT_STUDY, help="study file")
    parser.add_argument("--skip-postgres", action="store_true", help="only the DuckDB parts (2 and 3)")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--adapter", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--target-id", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--outcome-id", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--chunk-rows", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(_memory_child(args.adapter, args.study, args.target_id, args.outcome_id, args.chunk_rows)))
        return
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    from omopfl.features import DEFAULT_CHUNK_ROWS

    chunk_sizes = sorted({int(s) for s in args.chunk_sizes.split(",") if s.strip()} | {DEFAULT_CHUNK_ROWS})
    if chunk_sizes[0] < 1:
        raise SystemExit("--chunk-sizes must be positive")
    url = args.url or os.environ.get("OMOPFL_TEST_PG_URL", "")
    if not url and not args.skip_postgres:
        raise SystemExit("set OMOPFL_TEST_PG_URL or pass --url (scripts/with-postgres.sh starts a server)")

    saved = {k: os.environ.get(k) for k in ("OMOPFL_CACHE_DIR", "OMOPFL_IMAGE_CACHE")}
    result: dict[str, Any] = {
        "benchmark": "omopfl prepare: stream_features vs COPY on PostgreSQL, DICOM decode and cache, load_prepared",
        "study": str(args.study),
        "repeats": args.repeats,
    }
    try:
        with tempfile.TemporaryDirectory(prefix="omopfl-prepare-bench-") as tmp:
            os.environ["OMOPFL_CACHE_DIR"] = str(Path(tmp) / "cache")  # cohort SQL cache, removed with tmp
            if not args.skip_postgres:
                result["features_postgresql"] = _features_part(url, args.persons, args.repeats, chunk_sizes,
                                                               args.study.resolve(), Path(tmp) / "pg")
            dicom, load = _dicom_and_load_part(args.image_persons, args.repeats, args.study.resolve(),
                                               Path(tmp) / "duckdb")
            result["dicom_duckdb"] = dicom
            result["load_prepared"] = load
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _log("removed the temporary folders")
    result["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
