"""Bad input through the command line, on DuckDB and on PostgreSQL: the documented exit code and one line.

The corpus (``tests/bad_inputs/``, expectations in ``cases.toml``) holds adapters, studies and cohort
definitions that once passed silently, crashed with a traceback or destroyed data (issue 11).  The other
tests here damage a copy of a real synthetic site: an empty person table, absurd measurement values,
unknown concept ids, a wrong password, a refused port, a database dropped mid-run, a locked DuckDB file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import sqlalchemy as sa
import tomli_w
from conftest import PG_ADMIN_URL, ROOT, CliSite, cli_study_text, run_cli

from omopfl.db import make_engine, qualified
from omopfl.prepare import load_prepared

CORPUS = Path(__file__).parent / "bad_inputs"
CASES = tomllib.loads((CORPUS / "cases.toml").read_text())


@pytest.fixture(scope="module")
def site(backend_name, cli_site_factory) -> CliSite:
    return cli_site_factory(backend_name)


def _database_section(site: CliSite) -> str:
    if site.backend == "duckdb":
        return f'[database]\nduckdb_path = "{sa.engine.make_url(site.url).database}"'
    return f'[database]\nurl_env = "{site.env}"'


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        elif isinstance(value, list) and value and isinstance(value[0], dict) and isinstance(base.get(key), list):
            base[key] = [*base[key], *value]
        else:
            base[key] = value
    return base


def _one_line(code: int, err: list[str], expected_code: int, says: str) -> None:
    assert code == expected_code, (code, err)
    assert len(err) == 1, err
    assert err[0].startswith("omopfl: error: "), err
    assert says in err[0], err[0]
    assert "Traceback" not in err[0] and "sqlalchemy" not in err[0].lower()


@pytest.mark.parametrize("case", sorted(CASES["adapters"]))
def test_bad_adapter(site: CliSite, case: str, tmp_path: Path, capsys) -> None:
    expected_code, says = CASES["adapters"][case][:2]
    adapter = tmp_path / f"{case}.toml"
    adapter.write_text((CORPUS / "adapters" / f"{case}.toml").read_text().replace("@DATABASE@",
                                                                                    _database_section(site)))
    out = tmp_path / "out"
    (out / "other_site").mkdir(parents=True)
    (out / "other_site" / "manifest.json").write_text("{}")
    code, _, err = run_cli(["prepare", "--site", adapter, "--study", site.study, "--out", out], capsys)
    _one_line(code, err, expected_code, says)
    assert (out / "other_site" / "manifest.json").read_text() == "{}"  # --out and other sites' data intact


@pytest.mark.parametrize("case", sorted(CASES["studies"]))
def test_bad_study(site: CliSite, case: str, tmp_path: Path, capsys) -> None:
    expected_code, says, *raw = CASES["studies"][case]
    source = CORPUS / "studies" / f"{case}.toml"
    study = tmp_path / "study.toml"
    if raw:
        study.write_bytes(source.read_bytes())
    else:
        document = _merge(tomllib.loads(cli_study_text()), tomllib.loads(source.read_text()))
        study.write_text(tomli_w.dumps(document))
    code, _, err = run_cli(["validate", "--site", site.adapter, "--study", study], capsys)
    _one_line(code, err, expected_code, says)


@pytest.mark.parametrize("case", sorted(CASES["cohorts"]))
def test_bad_cohort(site: CliSite, case: str, capsys) -> None:
    expected_code, says = CASES["cohorts"][case]
    (path,) = (CORPUS / "cohorts").glob(f"{case}.*")
    code, _, err = run_cli(["cohort", "build", path, "--site", site.adapter, "--id", "900"], capsys)
    _one_line(code, err, expected_code, says)


# ----------------------------------------------------------------------------------------- damaged sites
def _cdm(site: CliSite) -> str:
    from omopfl.config import load_site

    return load_site(site.adapter).cdm_schema


def _execute(site: CliSite, *statements: str) -> None:
    engine = make_engine(site.url)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(sa.text(statement))
    finally:
        engine.dispose()


def test_empty_person_table_is_fatal_and_validate_exits_6(site: CliSite, capsys) -> None:
    damaged = site.clone("noperson")
    _execute(damaged, f"DELETE FROM {qualified(_cdm(damaged), 'person')}")
    code, out, err = run_cli(["validate", "--site", damaged.adapter, "--study", site.study, "--json"], capsys)
    assert code == 6, err
    report = json.loads(out)
    failed = {r["check"] for r in report["results"] if not r["passed"] and r["level"] == "fatal"}
    assert "personTableNotEmpty" in failed
    code, _, err = run_cli(["prepare", "--site", damaged.adapter, "--study", site.study, "--out",
                            damaged.base / "prepared"], capsys)
    _one_line(code, err, 5, "personTableNotEmpty")
    assert not (damaged.base / "prepared" / "site_a").exists()


def test_absurd_measurements_are_counted_and_dropped(site: CliSite, tmp_path: Path, capsys) -> None:
    """1e308 (and pairs that overflow a mean) are counted as non-finite on both backends, never aborting."""
    damaged = site.clone("absurd")
    measurement = qualified(_cdm(damaged), "measurement")
    _execute(damaged, f"UPDATE {measurement} SET value_as_number = 1e308 WHERE measurement_concept_id = 3004501 "
                      "AND MOD(measurement_id, 3) = 0",
             f"UPDATE {measurement} SET value_as_number = -1e308 WHERE measurement_concept_id = 3004410 "
             "AND MOD(measurement_id, 4) = 0")
    study = tmp_path / "study.toml"
    study.write_text(cli_study_text().replace('aggregate = "last"', 'aggregate = "mean"'))
    code, out, err = run_cli(["prepare", "--site", damaged.adapter, "--study", study, "--out", tmp_path / "p",
                              "--json"], capsys)
    assert code == 0, err
    features = json.loads(out)["harmonization"]["features"]
    assert features["glucose"]["non_finite"] > 0 and features["hba1c"]["non_finite"] > 0
    prepared = load_prepared(tmp_path / "p" / "site_a")
    import numpy as np

    assert np.all(np.isfinite(prepared.x) | np.isnan(prepared.x)) and np.nanmax(np.abs(prepared.x)) < 1e6


def test_unknown_concept_id_is_a_warning_naming_id_and_feature(site: CliSite, tmp_path: Path, capsys) -> None:
    study = tmp_path / "study.toml"
    study.write_text(cli_study_text().replace("concepts = [316866]", "concepts = [316866, 987654321]"))
    code, out, err = run_cli(["validate", "--site", site.adapter, "--study", study, "--json"], capsys)
    assert code == 0, err
    warnings = [r for r in json.loads(out)["results"] if r["check"] == "conceptInVocabulary" and not r["passed"]]
    assert [w["field"] for w in warnings] == ["hypertension"]
    assert "987654321" in warnings[0]["description"] and warnings[0]["level"] == "warning"


def test_missing_duckdb_file_is_not_created(site: CliSite, tmp_path: Path, capsys) -> None:
    adapter = tmp_path / "site.toml"
    adapter.write_text('[site]\nname = "site_a"\n[database]\nduckdb_path = "absent.duckdb"\ncdm_schema = "cdm"\n'
                       'results_schema = "results"\n')
    code, _, err = run_cli(["sites", "check", adapter], capsys)
    _one_line(code, err, 2, "duckdb_path names a file that does not exist")
    assert not (tmp_path / "absent.duckdb").exists()


# ----------------------------------------------------------------------------------------- driver errors
def _adapter_for_url(site: CliSite, tmp_path: Path, url: str, monkeypatch) -> Path:
    monkeypatch.setenv("OMOPFL_TEST_BAD_URL", url)
    adapter = tmp_path / "site.toml"
    adapter.write_text('[site]\nname = "site_a"\n[database]\nurl_env = "OMOPFL_TEST_BAD_URL"\ncdm_schema = "cdm"\n'
                       'results_schema = "results"\n')
    return adapter


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("command", ["sites check", "prepare", "cohort build"])
def test_refused_port_and_wrong_password(site: CliSite, command: str, tmp_path: Path, capsys, monkeypatch) -> None:
    if site.backend == "duckdb":
        pytest.skip("a server's port and password are PostgreSQL's (DuckDB's lock: test_locked_duckdb_file)")
    url = sa.engine.make_url(site.url)
    role = os.environ.get("OMOPFL_TEST_PG_PASSWORD_ROLE")
    cases = [(url.set(port=_free_port()), "connection refused")]
    if role:
        _execute(site, f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN "
                       f"CREATE ROLE {role} LOGIN PASSWORD 'right-password'; END IF; END $$")
        cases.append((url.set(username=role, password="wrong-password"), "authentication failed"))
    elif os.environ.get("CI"):
        pytest.fail("OMOPFL_TEST_PG_PASSWORD_ROLE is not set in CI: run the tests through scripts/with-postgres.sh")
    tail = {"sites check": [], "prepare": ["--study", site.study, "--out", tmp_path / "out"],
            "cohort build": [ROOT / "cohorts" / "incident_t2dm.yaml"]}[command]
    for bad_url, says in cases:
        adapter = _adapter_for_url(site, tmp_path, bad_url.render_as_string(hide_password=False), monkeypatch)
        args = [*command.split(), *tail[:1], "--site", adapter, *tail[1:]] if command == "cohort build" else \
            [*command.split(), *([adapter] if command == "sites check" else ["--site", adapter]), *tail]
        code, _, err = run_cli(args, capsys)
        _one_line(code, err, 3, says)
        assert "password" not in err[0].replace("check the user name and password", "")
        assert "CREATE" not in err[0]  # a wrong password is not a missing grant


def test_database_dropped_mid_run(site: CliSite, tmp_path: Path, capsys, monkeypatch) -> None:
    """The database disappears between the features and validation: one line, exit 3, nothing written."""
    if site.backend == "duckdb":
        pytest.skip("an embedded database cannot be dropped under a running process")
    damaged = site.clone("dropped")
    name = sa.engine.make_url(damaged.url).database
    import omopfl.prepare as prepare

    original = prepare._validate

    def drop_then_validate(*args, **kwargs):
        admin = make_engine(PG_ADMIN_URL).execution_options(isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()
        return original(*args, **kwargs)

    monkeypatch.setattr(prepare, "_validate", drop_then_validate)
    code, _, err = run_cli(["prepare", "--site", damaged.adapter, "--study", site.study, "--out",
                            damaged.base / "prepared"], capsys)
    _one_line(code, err, 3, "closed the connection")
    assert not (damaged.base / "prepared" / "site_a").exists()


def test_locked_duckdb_file(site: CliSite, capsys) -> None:
    if site.backend != "duckdb":
        pytest.skip("file locks are DuckDB's")
    path = sa.engine.make_url(site.url).database
    holder = subprocess.Popen([sys.executable, "-c", f"import duckdb, sys; c = duckdb.connect({path!r}); "
                               "print('locked', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for args in (["sites", "check", site.adapter], ["validate", "--site", site.adapter, "--study", site.study]):
            code, _, err = run_cli(args, capsys)
            _one_line(code, err, 3, "the DuckDB file is locked by another process")
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


# ----------------------------------------------------------------------------------------- CLI checks
def test_validate_exit_code_is_returned_by_the_console_script(site: CliSite) -> None:
    """The installed entry point (``omopfl.cli:run``) keeps typer's returned exit codes."""
    damaged = site.clone("exit6")
    _execute(damaged, f"DELETE FROM {qualified(_cdm(damaged), 'person')}")
    env = {**os.environ, **({damaged.env: damaged.url} if damaged.env else {})}
    done = subprocess.run([sys.executable, "-m", "omopfl.cli", "validate", "--site", str(damaged.adapter),
                           "--study", str(site.study), "--json"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 6, done.stderr[-2000:]
    assert done.stderr.strip() == ""


@pytest.mark.parametrize("command", ["train", "stats"])
def test_nothing_prepared_is_one_line(site: CliSite, command: str, tmp_path: Path, capsys) -> None:
    args = {"train": ["train", "--simulate"], "stats": ["stats", "--mode", "inprocess", "--out", tmp_path / "s.json"]}
    code, _, err = run_cli([*args[command], "--study", site.study, "--site", site.adapter, "--prepared",
                            tmp_path / "empty"], capsys)
    _one_line(code, err, 2, "no prepared dataset for any of the 1 site(s)")


def test_server_port_out_of_range_is_a_usage_error(site: CliSite, capsys) -> None:
    code, _, err = run_cli(["server", "--study", site.study, "--port", "70000", "--insecure"], capsys)
    assert code == 2 and "Traceback" not in "\n".join(err) and "OverflowError" not in "\n".join(err)


def test_role_without_temp_is_told_to_grant_temp(site: CliSite, tmp_path: Path, capsys, monkeypatch) -> None:
    """A read-only CDM role also needs TEMP on the database (CIRCE SQL makes temp tables): the line says so."""
    if site.backend != "postgresql":
        pytest.skip("database roles and grants are PostgreSQL's")
    import uuid

    from omopfl.config import load_site

    damaged = site.clone("notemp")
    config = load_site(damaged.adapter)
    role, database = f"notemp_{uuid.uuid4().hex[:8]}", sa.engine.make_url(damaged.url).database
    _execute(damaged, f'CREATE ROLE "{role}" LOGIN', f'GRANT USAGE ON SCHEMA "{config.cdm_schema}" TO "{role}"',
             f'GRANT SELECT ON ALL TABLES IN SCHEMA "{config.cdm_schema}" TO "{role}"',
             f'CREATE SCHEMA "r_{role}" AUTHORIZATION "{role}"',
             f'REVOKE TEMPORARY ON DATABASE "{database}" FROM PUBLIC')
    url = sa.engine.make_url(damaged.url).set(username=role, password=None)
    monkeypatch.setenv("OMOPFL_TEST_NOTEMP_URL", url.render_as_string(hide_password=False))
    adapter = tmp_path / "site.toml"
    adapter.write_text(f'[site]\nname = "site_a"\n[database]\nurl_env = "OMOPFL_TEST_NOTEMP_URL"\n'
                       f'cdm_schema = "{config.cdm_schema}"\nresults_schema = "r_{role}"\n')
    code, _, err = run_cli(["cohort", "build", ROOT / "cohorts" / "incident_t2dm.yaml", "--site", adapter,
                            "--id", "101"], capsys)
    _one_line(code, err, 3, "grant TEMP on the database to this role")


def test_stats_where_every_site_withholds_is_one_line(prepared_sites_factory, tmp_path: Path, capsys) -> None:
    """Every site's own rule withholds its statistics (more persons needed than it has): exit 7, one
    line saying no site contributed, the result still written with each site's status."""
    import re

    federation = prepared_sites_factory("all_withhold")
    for adapter in federation["adapters"]:
        adapter.write_text(re.sub(r"min_cell_count = \d+", "min_cell_count = 100000", adapter.read_text()))
    out = tmp_path / "stats.json"
    args = ["stats", "--mode", "inprocess", "--study", federation["study"], "--prepared", federation["prepared_dir"],
            "--out", out]
    for adapter in federation["adapters"]:
        args += ["--site", adapter]
    done = subprocess.run([sys.executable, "-m", "omopfl.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("omopfl: error")]
    assert "Traceback" not in done.stderr
    _one_line(done.returncode, errors, 7, "no site contributed statistics")
    result = json.loads(out.read_text())
    assert result["global"] is None and sorted(result["sites"]["withheld"]) == ["site_a", "site_b", "site_c"]
