"""Fingerprint what ``omopfl.synth.run_synth`` writes, to check a refactor leaves the output byte-identical.

Generates a few fixed configurations (DuckDB; also PostgreSQL when ``OMOPFL_TEST_PG_URL`` is set, e.g.
under ``scripts/with-postgres.sh``), then prints JSON: the SHA-256 of every written file (the DuckDB
file itself excepted: its bytes are not deterministic), of a sorted CSV dump of every table, and of
each returned summary (including the in-memory scores).  Run it before and after a change and diff.

Usage: ``python scripts/synth_fingerprint.py [work_dir]``
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from omopfl.db import make_engine, quote_identifier
from omopfl.synth import SiteSummary, run_synth

CONFIGS: dict[str, dict[str, Any]] = {
    "chunks": {"n_sites": 3, "persons": [300, 200, 150], "seed": 7, "image_share": 0.5, "omics_share": 0.5,
               "chunk_size": 120},
    "skew": {"n_sites": 2, "persons": 500, "seed": 3, "label_skew": 0.9},
}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tables(engine: sa.Engine, schemas: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    with engine.connect() as conn:
        inspector = sa.inspect(conn)
        for schema in schemas:
            for table in sorted(inspector.get_table_names(schema=schema)):
                columns = [c["name"] for c in inspector.get_columns(table, schema=schema)]
                order = ", ".join(quote_identifier(c) for c in columns)
                result = conn.execute(sa.text(
                    f"SELECT * FROM {quote_identifier(schema)}.{quote_identifier(table)} ORDER BY {order}"))
                text = "\n".join([",".join(columns)] + [",".join(repr(v) for v in row) for row in result])
                out[f"{schema}.{table}"] = _sha(text.encode())
    return out


def _summary(summary: SiteSummary) -> str:
    data = summary.truth_dict()
    parts = [json.dumps(data, sort_keys=True, default=str).encode()]
    if summary.scores is not None:
        parts += [summary.scores[0].tobytes(), summary.scores[1].tobytes()]
    return _sha(b"|".join(parts))


def fingerprint(work: Path) -> dict[str, Any]:
    report: dict[str, Any] = {}
    backends: list[tuple[str, str | None]] = [("duckdb", None)]
    if os.environ.get("OMOPFL_TEST_PG_URL"):
        backends.append(("postgresql", os.environ["OMOPFL_TEST_PG_URL"]))
    for backend, url in backends:
        for name, config in CONFIGS.items():
            out = work / f"{backend}-{name}"
            summaries = run_synth(out, pg_url=url, progress=False, **config)
            files = {p.relative_to(out).as_posix(): _sha(p.read_bytes()) for p in sorted(out.rglob("*"))
                     if p.is_file() and not p.name.endswith((".duckdb", ".duckdb.wal"))}
            tables: dict[str, str] = {}
            for s in summaries:
                engine = make_engine(url if url else f"duckdb:///{out / s.site / 'omop.duckdb'}")
                try:
                    tables.update({f"{s.site}:{k}": v for k, v in
                                   _tables(engine, [s.cdm_schema, s.results_schema]).items()})
                finally:
                    engine.dispose()
            report[f"{backend}-{name}"] = {
                "files": files,
                "tables": tables,
                "summaries": {s.site: _summary(s) for s in summaries},
            }
    return report


def main() -> None:
    if len(sys.argv) > 1:
        work = Path(sys.argv[1])
        work.mkdir(parents=True, exist_ok=True)
        print(json.dumps(fingerprint(work), indent=1, sort_keys=True))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(fingerprint(Path(tmp)), indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
