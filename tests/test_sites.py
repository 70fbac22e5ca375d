"""`omopfl sites check` on a small hand-built CDM, and its error paths through the real CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa

from omopfl.cdm import bulk_insert, create_cdm
from omopfl.cli import main
from omopfl.config import load_site
from omopfl.sites import check_site


def tiny_cdm(engine: sa.Engine, schema: str = "cdm") -> None:
    """Three persons, one of them without an observation period; planted defects."""
    with engine.begin() as conn:
        create_cdm(conn, schema, primary_keys=False)
        bulk_insert(conn, schema, "person", pd.DataFrame({
            "person_id": [1, 2, 3], "gender_concept_id": [8507, 8532, 8532], "year_of_birth": [1950, 1960, 1970],
            "race_concept_id": [0, 0, 0], "ethnicity_concept_id": [0, 0, 0],
        }))
        bulk_insert(conn, schema, "observation_period", pd.DataFrame({
            "observation_period_id": [1, 2, 3], "person_id": [1, 2, 99],
            "observation_period_start_date": pd.to_datetime(["2010-01-01", "2011-01-01", "2012-01-01"]).date,
            "observation_period_end_date": pd.to_datetime(["2020-01-01", "2021-01-01", "2013-01-01"]).date,
            "period_type_concept_id": [32817] * 3,
        }))
        bulk_insert(conn, schema, "condition_occurrence", pd.DataFrame({
            "condition_occurrence_id": [1, 2, 2], "person_id": [1, 1, 2],
            "condition_concept_id": [201826, 0, 320128],
            "condition_start_date": pd.to_datetime(["2015-01-01", "2005-01-01", "2015-06-01"]).date,
            "condition_type_concept_id": [32817] * 3,
        }))


def adapter(tmp_path: Path, url_env: str, schema: str = "cdm") -> Path:
    path = tmp_path / "site.toml"
    path.write_text(
        f'[site]\nname = "tiny"\n[database]\nurl_env = "{url_env}"\ncdm_schema = "{schema}"\n'
        'results_schema = "results"\n'
    )
    return path


def test_check_reports_counts_version_and_findings(backend, tmp_path: Path, monkeypatch) -> None:
    tiny_cdm(backend.engine)
    monkeypatch.setenv("OMOPFL_TINY_URL", backend.url)
    site = load_site(adapter(tmp_path, "OMOPFL_TINY_URL"))
    with backend.engine.connect() as conn:
        report = check_site(conn, site)
    assert report.cdm_version == "5.4"
    assert report.persons == 3
    assert report.row_counts["condition_occurrence"] == 3
    found = {(f.check, f.table): f.rows for f in report.findings}
    assert found[("persons_without_observation_period", "person")] == 1
    assert found[("observation_periods_of_absent_persons", "observation_period")] == 1
    assert found[("duplicate_primary_key", "condition_occurrence")] == 1
    assert found[("events_outside_observation", "condition_occurrence")] == 1
    assert found[("unmapped_concept", "condition_occurrence")] == 1
    assert found[("empty_vocabulary", "concept")] == 0
    assert ("results_schema_missing", "results") in found


def run_cli(*args: str) -> tuple[int, str, str]:
    """Run the installed console script, as a user would."""
    exe = Path(sys.executable).parent / "omopfl"
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def cli_error(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    err = capsys.readouterr().err
    return info.value.code, err


def assert_one_line(err: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("omopfl: error: ")


def test_missing_env_var(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("OMOPFL_ABSENT_URL", raising=False)
    code, err = cli_error(capsys, "sites", "check", str(adapter(tmp_path, "OMOPFL_ABSENT_URL")))
    assert code == 2
    assert_one_line(err)
    assert "OMOPFL_ABSENT_URL" in err


def test_unreachable_database_hides_credentials(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("OMOPFL_DEAD_URL", "postgresql://user:s3cretpw@127.0.0.1:1/nowhere")
    code, err = cli_error(capsys, "sites", "check", str(adapter(tmp_path, "OMOPFL_DEAD_URL")))
    assert code == 3
    assert_one_line(err)
    assert "s3cretpw" not in err and "connection refused" in err


def test_wrong_schema(backend, tmp_path: Path, monkeypatch, capsys) -> None:
    tiny_cdm(backend.engine)
    monkeypatch.setenv("OMOPFL_TINY_URL", backend.url)
    code, err = cli_error(capsys, "sites", "check", str(adapter(tmp_path, "OMOPFL_TINY_URL", "nosuchschema")))
    assert code == 4
    assert_one_line(err)
    assert "cdm_schema nosuchschema does not exist" in err


def test_schema_name_containing_sql(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("OMOPFL_TINY_URL", f"duckdb:///{tmp_path / 'x.duckdb'}")
    code, err = cli_error(capsys, "sites", "check", str(adapter(tmp_path, "OMOPFL_TINY_URL", "cdm; DROP SCHEMA cdm")))
    assert code == 2
    assert_one_line(err)
    assert "DROP" not in err


def test_database_without_cdm_tables(backend, tmp_path: Path, monkeypatch, capsys) -> None:
    with backend.engine.begin() as conn:
        conn.execute(sa.text('CREATE SCHEMA "cdm"'))
        conn.execute(sa.text('CREATE TABLE "cdm"."other" (x integer)'))
    monkeypatch.setenv("OMOPFL_TINY_URL", backend.url)
    code, err = cli_error(capsys, "sites", "check", str(adapter(tmp_path, "OMOPFL_TINY_URL")))
    assert code == 4
    assert_one_line(err)
    assert "has no OMOP CDM" in err


def test_console_script_json(tmp_path: Path) -> None:
    url = f"duckdb:///{tmp_path / 'tiny.duckdb'}"
    engine = sa.create_engine(url)
    tiny_cdm(engine)
    engine.dispose()  # DuckDB allows one writer process: release the file for the CLI
    path = tmp_path / "tiny.toml"
    path.write_text('[site]\nname = "tiny"\n[database]\nduckdb_path = "tiny.duckdb"\ncdm_schema = "cdm"\n'
                    'results_schema = "results"\n')
    code, out, err = run_cli("sites", "check", str(path), "--json")
    assert code == 0, err
    import json

    report = json.loads(out)[0]
    assert report["row_counts"]["person"] == 3 and report["cdm_version"] == "5.4"
