"""Benchmark of covariate construction (FeatureExtraction's default set) on PostgreSQL; prints JSON.

Two synthetic sites (:func:`omopfl.synth.run_synth`, seed 7) in throwaway databases: ``--persons``
(default 100k) and a smaller one (``--small-persons``, default 20k).  In each, the t2dm_hf study's cohorts
are built, ``condition_era`` and ``drug_era`` are derived in SQL (the generator writes no era tables: one
era per condition occurrence; one per drug exposure rolled up to its ingredient through
``concept_ancestor``), and the database is ``VACUUM (ANALYZE)``-ed.  Then:

1. **Time** on the large site, after one untimed warm-up of each, interleaved over ``--repeats``:
   :func:`omopfl.covariates.covariate_matrix` (server-side cursor, chunks into a CSR matrix) beside the
   bare SQL floor: ``COPY (<covariate_query>) TO STDOUT`` into a sink that only counts rows (results
   discarded), and their ratio.
2. **Client memory**: the ``tracemalloc`` peak of :func:`covariate_matrix` for the same number of target
   persons (``--memory-persons``, the first ones of the target cohort copied under another cohort id) at
   both CDM sizes: it depends on the cohort's covariates, not on the CDM's size.  And the peak of streaming
   the large site's whole cohort with every chunk dropped (bounded by the chunk size).

Progress goes to stderr; one JSON object to stdout.  The databases are dropped at the end.

Usage::

    bash scripts/with-postgres.sh .venv/bin/python bench/covariates_bench.py
    .venv/bin/python bench/covariates_bench.py --url postgresql://... --persons 100000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "examples" / "t2dm_hf" / "study.toml"
SEED = 7
SUBSET_ID = 990_002


def _log(message: str) -> None:
    print(f"[covariates_bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _pg_kwargs(url: str) -> dict:
    import sqlalchemy as sa

    parsed = sa.engine.make_url(url)
    kwargs = parsed.translate_connect_args(username="user", database="dbname")
    kwargs.update(parsed.query)
    return kwargs


def _autocommit(url: str):
    import psycopg2

    connection = psycopg2.connect(**_pg_kwargs(url))
    connection.autocommit = True
    return connection


class _Sink:
    def __init__(self) -> None:
        self.rows = 0

    def write(self, data: bytes | str) -> int:
        self.rows += data.count(b"\n" if isinstance(data, bytes) else "\n")
        return len(data)


ERAS = [
    "DROP TABLE IF EXISTS {cdm}.condition_era",
    "CREATE TABLE {cdm}.condition_era AS SELECT ROW_NUMBER() OVER () AS condition_era_id, person_id,"
    " condition_concept_id, condition_start_date AS condition_era_start_date,"
    " COALESCE(condition_end_date, condition_start_date) AS condition_era_end_date, 1 AS condition_occurrence_count"
    " FROM {cdm}.condition_occurrence",
    "DROP TABLE IF EXISTS {cdm}.drug_era",
    "CREATE TABLE {cdm}.drug_era AS SELECT ROW_NUMBER() OVER () AS drug_era_id, d.person_id,"
    " ca.ancestor_concept_id AS drug_concept_id, d.drug_exposure_start_date AS drug_era_start_date,"
    " COALESCE(d.drug_exposure_end_date, d.drug_exposure_start_date) AS drug_era_end_date"
    " FROM {cdm}.drug_exposure d JOIN {vocab}.concept_ancestor ca ON ca.descendant_concept_id = d.drug_concept_id"
    " JOIN {vocab}.concept c ON c.concept_id = ca.ancestor_concept_id AND c.concept_class_id = 'Ingredient'",
    "CREATE INDEX ON {cdm}.condition_era (person_id)",
    "CREATE INDEX ON {cdm}.drug_era (person_id)",
]


def _site(url: str, persons: int, out: Path, tag: str) -> tuple[Any, str, dict]:
    """A synthetic PostgreSQL site with cohorts and eras: (SiteConfig, its URL, facts)."""
    import sqlalchemy as sa

    from omopfl.config import load_site
    from omopfl.db import qualified, quote_identifier, site_engine
    from omopfl.prepare import ensure_cohorts
    from omopfl.study import load_study
    from omopfl.synth import run_synth

    database = f"omopfl_cov_bench_{tag}_{os.getpid()}"
    with _autocommit(url).cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{database}"')
    site_url = sa.engine.make_url(url).set(database=database).render_as_string(hide_password=False)
    env = f"OMOPFL_COV_BENCH_{tag.upper()}_URL"
    os.environ[env] = site_url
    started = time.perf_counter()
    summary = run_synth(out / tag, n_sites=1, persons=[persons], seed=SEED, pg_url_env=env, image_share=0.0,
                        omics_share=0.0, adapters_dir=out / tag / "adapters", progress=False)[0]
    facts: dict[str, Any] = {"persons": persons, "synth_seconds": round(time.perf_counter() - started, 1),
                             "cdm_rows": sum(summary.rows.values())}
    site = load_site(summary.adapter)
    engine = site_engine(site)
    try:
        cohorts = ensure_cohorts(engine, site, load_study(STUDY))
        with engine.begin() as conn:
            cdm, vocab = quote_identifier(site.cdm_schema), quote_identifier(site.vocabulary_schema)
            for statement in ERAS:
                conn.execute(sa.text(statement.format(cdm=cdm, vocab=vocab)))
            facts["condition_era_rows"] = conn.execute(sa.text(f"SELECT COUNT(*) FROM {cdm}.condition_era")).scalar()
            facts["drug_era_rows"] = conn.execute(sa.text(f"SELECT COUNT(*) FROM {cdm}.drug_era")).scalar()
            facts["target_persons"] = conn.execute(sa.text(
                f"SELECT COUNT(DISTINCT subject_id) FROM {qualified(site.results_schema, 'cohort')}"
                " WHERE cohort_definition_id = :t"),
                {"t": cohorts["target"]["id"]}).scalar()
    finally:
        engine.dispose()
    with _autocommit(site_url).cursor() as cursor:
        cursor.execute("VACUUM (ANALYZE)")
    facts["target_id"] = cohorts["target"]["id"]
    _log(f"{tag}: {persons} persons, {facts['target_persons']} target persons, eras derived")
    return site, site_url, facts


def _subset(site, site_url: str, target_id: int, n: int) -> None:
    from omopfl.db import qualified

    cohort = qualified(site.results_schema, "cohort")
    with _autocommit(site_url).cursor() as cursor:
        cursor.execute(f"DELETE FROM {cohort} WHERE cohort_definition_id = {SUBSET_ID}")
        cursor.execute(f"INSERT INTO {cohort} SELECT {SUBSET_ID}, subject_id, MIN(cohort_start_date),"
                       f" MIN(cohort_end_date) FROM {cohort} WHERE cohort_definition_id = {int(target_id)}"
                       f" GROUP BY subject_id ORDER BY subject_id LIMIT {int(n)}")
        cursor.execute(f"ANALYZE {cohort}")


def _persons(engine, site, target_id: int) -> list[int]:
    from omopfl.db import qualified

    with engine.connect() as conn:
        return [r[0] for r in conn.exec_driver_sql(
            f"SELECT DISTINCT subject_id FROM {qualified(site.results_schema, 'cohort')}"
            f" WHERE cohort_definition_id = {int(target_id)}")]


def _matrix(engine, site, target_id: int, settings, persons: list[int]) -> Any:
    """The timed part: the covariate query streamed into the CSR matrix (an open engine, persons known)."""
    from omopfl.covariates import covariate_matrix

    with engine.connect() as conn:
        return covariate_matrix(conn, site, target_id, settings, persons)


def _peak(call) -> tuple[Any, float]:
    tracemalloc.start()
    try:
        result = call()
        return result, round(tracemalloc.get_traced_memory()[1] / 2**20, 2)
    finally:
        tracemalloc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("OMOPFL_TEST_PG_URL", ""))
    parser.add_argument("--persons", type=int, default=100_000)
    parser.add_argument("--small-persons", type=int, default=20_000)
    parser.add_argument("--memory-persons", type=int, default=2_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not args.url:
        sys.exit("covariates_bench: give --url (or run through scripts/with-postgres.sh)")
    import psycopg2

    from omopfl.covariate_sets import CovariateSettings
    from omopfl.covariates import covariate_query, stream_covariates
    from omopfl.db import make_engine

    settings = CovariateSettings()  # FeatureExtraction's default set (as implemented)
    out = Path(tempfile.mkdtemp(prefix="omopfl-cov-bench-"))
    databases: list[str] = []
    try:
        large, large_url, large_facts = _site(args.url, args.persons, out, "large")
        databases.append(large_url)
        small, small_url, small_facts = _site(args.url, args.small_persons, out, "small")
        databases.append(small_url)
        target = large_facts["target_id"]
        sql = covariate_query(large, target, settings)
        connection = psycopg2.connect(**_pg_kwargs(large_url))
        engine = make_engine(large_url)
        persons = _persons(engine, large, target)
        ours, floor, rows = [], [], 0
        try:
            for i in range(args.repeats + 1):
                t = time.perf_counter()
                cm = _matrix(engine, large, target, settings, persons)
                ours_s = time.perf_counter() - t
                sink = _Sink()
                t = time.perf_counter()
                with connection.cursor() as cursor:
                    cursor.copy_expert(f"COPY ({sql}) TO STDOUT", sink)
                floor_s = time.perf_counter() - t
                rows = sink.rows
                if i:  # the first of each is a warm-up
                    ours.append(ours_s)
                    floor.append(floor_s)
                    _log(f"repeat {i}/{args.repeats}: covariate_matrix {ours_s:.2f} s, COPY floor {floor_s:.2f} s")
        finally:
            connection.close()
            engine.dispose()
        nnz, n_cov = int(cm.matrix.nnz), int(cm.matrix.shape[1])
        memory: dict[str, Any] = {"cohort_persons": args.memory_persons}
        for tag, site, url, facts in (("small", small, small_url, small_facts),
                                      ("large", large, large_url, large_facts)):
            _subset(site, url, facts["target_id"], args.memory_persons)
            engine = make_engine(url)
            try:
                ids = _persons(engine, site, SUBSET_ID)
                sub, peak = _peak(lambda engine=engine, site=site, ids=ids: _matrix(engine, site, SUBSET_ID, settings,
                                                                                     ids))
            finally:
                engine.dispose()
            memory[f"{tag}_cdm_persons"] = facts["persons"]
            memory[f"{tag}_tracemalloc_peak_mb"] = peak
            memory[f"{tag}_nonzeros"] = int(sub.matrix.nnz)
            _log(f"memory: {tag} CDM ({facts['persons']} persons), {args.memory_persons} cohort persons: "
                 f"peak {peak} MB")

        def stream_all() -> int:
            engine = make_engine(large_url)
            try:
                with engine.connect() as conn:
                    return sum(len(c) for c in stream_covariates(conn, large, target, settings, chunk_rows=10_000))
            finally:
                engine.dispose()

        streamed, stream_peak = _peak(stream_all)
        memory["stream_whole_cohort_chunk_10000_peak_mb"] = stream_peak
        memory["stream_whole_cohort_rows"] = streamed
        result = {
            "bench": "covariates",
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
            "analyses": list(settings.analyses),
            "large_site": large_facts, "small_site": small_facts,
            "construction": {
                "target_persons": large_facts["target_persons"], "covariates": n_cov, "nonzeros": nnz,
                "long_rows_floor": rows,
                "covariate_matrix_seconds_median": round(statistics.median(ours), 3),
                "copy_floor_seconds_median": round(statistics.median(floor), 3),
                "ratio": round(statistics.median(ours) / statistics.median(floor), 2),
                "matrix_mb": round((cm.matrix.data.nbytes + cm.matrix.indices.nbytes + cm.matrix.indptr.nbytes)
                                   / 2**20, 2),
            },
            "memory": memory,
        }
        print(json.dumps(result, indent=1))
    finally:
        import shutil

        import sqlalchemy as sa

        for url in databases:
            name = sa.engine.make_url(url).database
            with _autocommit(args.url).cursor() as cursor:
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
