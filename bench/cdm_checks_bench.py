"""Seconds of the CDM checks on one synthetic PostgreSQL site: ``omopfl sites check`` and validate's CDM
conformance (the two share their ``sql/cdm_*.sql`` checks); prints JSON.

Setup: a fresh database on the server named by ``OMOPFL_TEST_PG_URL`` (or ``--url``), one synthetic
site of ``--persons`` persons (no images or omics), the t2dm_hf example study.  Each check runs
``--repeats`` times on a new connection; the median is reported.  The database is dropped afterwards.

Usage::

    bash scripts/with-postgres.sh .venv/bin/python bench/cdm_checks_bench.py --persons 100000
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
import uuid
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--persons", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--url", default=os.environ.get("OMOPFL_TEST_PG_URL", ""),
                        help="a PostgreSQL superuser URL (default: OMOPFL_TEST_PG_URL)")
    args = parser.parse_args()
    if not args.url:
        sys.exit("cdm_checks_bench: set OMOPFL_TEST_PG_URL or pass --url (scripts/with-postgres.sh starts one)")
    from omopfl.config import load_site
    from omopfl.conformance import cdm_conformance
    from omopfl.db import make_engine
    from omopfl.sites import check_site
    from omopfl.study import load_study
    from omopfl.synth import run_synth

    name = f"bench_cdm_{uuid.uuid4().hex[:8]}"
    admin = make_engine(args.url).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(args.url).set(database=name).render_as_string(hide_password=False)
    env = f"OMOPFL_BENCH_{uuid.uuid4().hex[:8].upper()}_URL"
    os.environ[env] = url
    engine = None
    try:
        with tempfile.TemporaryDirectory(prefix="omopfl-cdm-bench-") as out:
            run_synth(Path(out), n_sites=1, persons=[args.persons], seed=3, image_share=0.0, omics_share=0.0,
                      progress=False, pg_url=url, pg_url_env=env)
            site = load_site(Path(out) / "adapters" / "site_a.toml")
            study = load_study(ROOT / "examples" / "t2dm_hf" / "study.toml")
            engine = make_engine(site.database_url())
            checks = {"sites_check": lambda conn: check_site(conn, site),
                      "cdm_conformance": lambda conn: cdm_conformance(conn, site, study=study)}
            seconds: dict[str, list[float]] = {}
            for label, run in checks.items():
                for _ in range(args.repeats):
                    with engine.connect() as conn:
                        started = time.perf_counter()
                        run(conn)
                        seconds.setdefault(label, []).append(round(time.perf_counter() - started, 3))
    finally:
        if engine is not None:
            engine.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()
        os.environ.pop(env, None)
    print(json.dumps({"bench": "cdm_checks_bench", "python": platform.python_version(), "cpus": os.cpu_count(),
                      "persons": args.persons,
                      "seconds_median": {k: statistics.median(v) for k, v in seconds.items()},
                      "seconds_all": seconds}, indent=2))


if __name__ == "__main__":
    main()
