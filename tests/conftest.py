"""Shared fixtures: every database test runs on embedded DuckDB and on a real PostgreSQL.

PostgreSQL comes from ``OMOPFL_TEST_PG_URL`` (a superuser URL; ``scripts/with-postgres.sh``
starts a throwaway server and sets it).  Without it, PostgreSQL cases are skipped
locally but fail in CI (``CI=true``), so a green CI always means both backends ran.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from omopfl.db import make_engine

os.environ.setdefault("OMP_NUM_THREADS", "1")
for _key, _value in {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                     "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}.items():
    os.environ.setdefault(_key, _value)
# Caches (translated cohort SQL, decoded pixels) go to a throwaway folder, not the user's home.
os.environ.setdefault("OMOPFL_CACHE_DIR", tempfile.mkdtemp(prefix="omopfl-test-cache-"))
PG_ADMIN_URL = os.environ.get("OMOPFL_TEST_PG_URL", "")


@dataclass
class Backend:
    """A fresh, empty database on one backend."""

    name: str  # "duckdb" or "postgresql"
    url: str
    engine: sa.Engine

    def new_url(self, tmp_path: Path, tag: str) -> str:
        """URL of another fresh database on the same backend (e.g. one per synthetic site)."""
        if self.name == "duckdb":
            return f"duckdb:///{tmp_path / f'{tag}.duckdb'}"
        return _create_pg_database(tag)


def _create_pg_database(tag: str) -> str:
    name = f"t_{tag}_{uuid.uuid4().hex[:10]}".lower()
    admin = make_engine(PG_ADMIN_URL).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return str(sa.engine.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False))


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    if not PG_ADMIN_URL:
        if os.environ.get("CI"):
            pytest.fail("OMOPFL_TEST_PG_URL is not set in CI: run the tests through scripts/test.sh")
        pytest.skip("PostgreSQL not available: set OMOPFL_TEST_PG_URL or run scripts/test.sh")
    return PG_ADMIN_URL


BACKENDS = ("duckdb", "postgresql")
"""Every database test runs on each of these (embedded DuckDB, a PostgreSQL server)."""


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """A fresh empty database, once on DuckDB and once on PostgreSQL."""
    if request.param == "duckdb":
        url = f"duckdb:///{tmp_path / 'test.duckdb'}"
    else:
        request.getfixturevalue("pg_admin_url")
        url = _create_pg_database("db")
    engine = make_engine(url)
    try:
        yield Backend(request.param, url, engine)
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def database_factory(tmp_path_factory: pytest.TempPathFactory):
    """Make a fresh database on a backend, for module-scoped fixtures: ``make("duckdb" | "postgresql", tag)``."""

    def make(name: str, tag: str) -> str:
        if name == "duckdb":
            return f"duckdb:///{tmp_path_factory.mktemp(tag) / 'omop.duckdb'}"
        if not PG_ADMIN_URL:
            if os.environ.get("CI"):
                pytest.fail("OMOPFL_TEST_PG_URL is not set in CI: run the tests through scripts/test.sh")
            pytest.skip("PostgreSQL not available: set OMOPFL_TEST_PG_URL or run scripts/test.sh")
        return _create_pg_database(tag)

    return make


@pytest.fixture(scope="module", params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    """The backend of a module's shared databases (``duckdb`` or ``postgresql``): module fixtures that build
    a site take this, so every test using them runs once per backend."""
    return request.param


@dataclass
class Site:
    """One site's database, ready: its adapter, an engine, and what was planted in it."""

    backend: str
    config: Any
    engine: sa.Engine
    truth: dict | None = None
    eunomia: object | None = None


def _test_env_name() -> str:
    return f"OMOPFL_TEST_{uuid.uuid4().hex[:8].upper()}_URL"


@pytest.fixture(scope="module")
def synth_site(backend_name: str, database_factory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """One small synthetic site (900 persons, seed 7, no images or omics); ``truth`` holds the generator's
    counts, including the planted dirty rows."""
    from omopfl.config import load_site
    from omopfl.synth import run_synth

    url = database_factory(backend_name, "synthsite")
    out = tmp_path_factory.mktemp("synthsite")
    env = _test_env_name()
    os.environ[env] = url
    pg = {"pg_url": url, "pg_url_env": env} if backend_name == "postgresql" else {}
    (summary,) = run_synth(out, n_sites=1, persons=[900], seed=7, image_share=0, omics_share=0, progress=False,
                           **pg)
    config = load_site(out / "adapters" / "site_a.toml")
    engine = make_engine(config.database_url())
    yield Site(backend_name, config, engine, truth=summary.truth_dict())
    engine.dispose()
    os.environ.pop(env, None)


@pytest.fixture(scope="module")
def eunomia_site(backend_name: str, database_factory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """OHDSI's Eunomia GiBleed, its defects kept, in a fresh database; ``eunomia`` is the loader's summary."""
    from omopfl.config import load_site
    from omopfl.eunomia import load_eunomia, write_adapter

    url = database_factory(backend_name, "eunomiasite")
    engine = make_engine(url)
    with engine.begin() as conn:
        summary = load_eunomia(conn, cdm_schema="cdm")
    env = _test_env_name()
    os.environ[env] = url
    config = load_site(write_adapter(tmp_path_factory.mktemp("eunomiasite") / "eunomia.toml", "eunomia",
                                     url_env=env))
    yield Site(backend_name, config, engine, eunomia=summary)
    engine.dispose()
    os.environ.pop(env, None)


ROOT = Path(__file__).resolve().parents[1]
FEDERATION_SITES = ("site_a", "site_b", "site_c")
TEST_MIN_CELL_COUNT = 2
"""min_cell_count of the three shared test sites: their test splits hold 9 or fewer outcomes, so with the
default 10 the release rule (every confusion-matrix cell >= k) would withhold every evaluation.  The rule
itself is tested with k = 10 (tests/test_disclosure.py, tests/test_stats.py)."""


@pytest.fixture(scope="session")
def _three_prepared_sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three synthetic DuckDB sites prepared for the t2dm_hf study (no images/omics), built once."""
    from omopfl.config import load_site
    from omopfl.prepare import prepare_site
    from omopfl.study import load_study
    from omopfl.synth import run_synth

    base = tmp_path_factory.mktemp("three_sites")
    text = (ROOT / "examples" / "t2dm_hf" / "study.toml").read_text()
    text = text.replace('"../../cohorts/', f'"{ROOT}/cohorts/').replace("enabled = true", "enabled = false")
    # the small test sites' models at 0.5 split site_a's test rows into cells of >= TEST_MIN_CELL_COUNT
    text = text.replace("threshold = 0.2", "threshold = 0.5")
    (base / "study.toml").write_text(text)
    study = load_study(base / "study.toml")
    run_synth(base / "synth", n_sites=3, persons=[1200, 800, 450], seed=11, image_share=0.0, omics_share=0.0,
              progress=False)
    for name in FEDERATION_SITES:  # small test sites: k = TEST_MIN_CELL_COUNT so evaluations can leave them
        adapter = base / "synth" / "adapters" / f"{name}.toml"
        adapter.write_text(adapter.read_text().replace("min_cell_count = 10",
                                                       f"min_cell_count = {TEST_MIN_CELL_COUNT}"))
    for name in FEDERATION_SITES:
        site = load_site(base / "synth" / "adapters" / f"{name}.toml")
        engine = make_engine(site.database_url())
        try:
            prepare_site(engine, site, study, base / "prepared")
        finally:
            engine.dispose()
    return base


@pytest.fixture(scope="session")
def prepared_sites_factory(_three_prepared_sites: Path, tmp_path_factory: pytest.TempPathFactory):
    """``make(tag)``: a private copy of the three prepared sites (runs write scalers into them), each of
    which has approved the study (``approve=False``: none has).

    Returns ``{"tmp", "study", "study_hash", "prepared_dir", "adapters"}``.
    """
    import shutil

    from omopfl.study import load_study

    def make(tag: str, *, approve: bool = True) -> dict:
        from omopfl import policy
        from omopfl.config import load_site

        tmp = tmp_path_factory.mktemp(tag)
        for item in ("study.toml", "synth", "prepared"):
            source = _three_prepared_sites / item
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, tmp / item)
        if approve:  # each site's data engineer approved the study (omopfl sites approve)
            spec = load_study(tmp / "study.toml")
            for name in FEDERATION_SITES:
                policy.approve(load_site(tmp / "synth" / "adapters" / f"{name}.toml"), spec)
        return {"tmp": tmp, "study": tmp / "study.toml", "study_hash": load_study(tmp / "study.toml").hash,
                "prepared_dir": tmp / "prepared",
                "adapters": [tmp / "synth" / "adapters" / f"{name}.toml" for name in FEDERATION_SITES]}

    return make


def prepare_and_approve(adapters, spec, prepared) -> None:
    """Each site prepares the study ``spec`` into ``prepared`` in its own database and approves it, as a
    site's data engineer does with ``omopfl prepare`` and ``omopfl sites approve`` (a study variant of the
    shared sites: other DP, split or aggregation settings)."""
    from omopfl import policy
    from omopfl.config import load_site
    from omopfl.prepare import prepare_site

    for adapter in adapters:
        site = load_site(adapter)
        engine = make_engine(site.database_url())
        try:
            prepare_site(engine, site, spec, prepared)
        finally:
            engine.dispose()
        policy.approve(site, spec)


SECURE_AGGREGATION = "\n[privacy]\nsecure_aggregation = true\n"
"""The study lines that ask for secure aggregation (appended to a study without a [privacy] table)."""


@dataclass(frozen=True)
class StudyVariant:
    """A study written beside the shared sites, prepared and approved at every site."""

    study: Path
    spec: Any
    prepared: Path

    @property
    def hash(self) -> str:
        return self.spec.hash


def study_variant(federation: dict[str, Any], tag: str, text: str) -> StudyVariant:
    """Write ``text`` as ``study_<tag>.toml`` beside the shared sites; each site prepares it into
    ``prepared_<tag>`` and approves it (:func:`prepare_and_approve`)."""
    from omopfl.study import load_study

    study = federation["tmp"] / f"study_{tag}.toml"
    study.write_text(text)
    spec = load_study(study)
    prepared = federation["tmp"] / f"prepared_{tag}"
    prepare_and_approve(federation["adapters"], spec, prepared)
    return StudyVariant(study, spec, prepared)


def serve_at_site(content, context, message_type: str, *, run_id: int, message_id: str, node_id: int = 1):
    """What a coordinator receives when ``content`` reaches a site's trust boundary (``site_app.serve``) as a
    SuperNode delivers it: the one way the tests hand a crafted message to a site."""
    from omopfl.federation import flower_internals
    from omopfl.federation.site import app as site_app

    with flower_internals.superlink_task_identity(run_id, node_id):
        message = flower_internals.delivered_message(content, dst_node_id=int(context.node_id),
                                                   message_type=message_type, message_id=message_id, run_id=run_id)
        return site_app.serve(message, context)


@pytest.fixture()
def duckdb_backend(tmp_path: Path) -> Iterator[Backend]:
    url = f"duckdb:///{tmp_path / 'test.duckdb'}"
    engine = make_engine(url)
    yield Backend("duckdb", url, engine)
    engine.dispose()


_BACKEND_OUTCOMES: dict[str, dict[str, int]] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Count outcomes per backend so the run shows the DB tests ran on both."""
    if report.when != "call" and not (report.when == "setup" and report.outcome != "passed"):
        return
    for name in ("duckdb", "postgresql"):
        if f"[{name}" in report.nodeid or report.nodeid.endswith(f"[{name}]"):
            outcomes = _BACKEND_OUTCOMES.setdefault(name, {})
            outcomes[report.outcome] = outcomes.get(report.outcome, 0) + 1


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    terminalreporter.section("database backends")
    for name in ("duckdb", "postgresql"):
        outcomes = _BACKEND_OUTCOMES.get(name, {})
        text = ", ".join(f"{n} {k}" for k, n in sorted(outcomes.items())) or "no tests"
        terminalreporter.write_line(f"{name:>10}: {text}")


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT_STATUS.append(int(exitstatus))


def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave right after pytest's summary, keeping its exit status.

    DuckDB 2.0's binding prints pages of harmless "nanobind: leaked ..." lines during interpreter
    teardown, which would bury pytest's closing summary line.  Everything pytest reports has been
    written by now; skip the teardown.  Set OMOPFL_TEST_NORMAL_EXIT=1 to keep the normal exit.
    """
    if _EXIT_STATUS and not os.environ.get("OMOPFL_TEST_NORMAL_EXIT"):
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])


def run_omopfl(args: list[str]) -> int:
    """Run the ``omopfl`` command line in this process; its exit code (0 when it returns)."""
    from omopfl.cli import main

    try:
        main(list(args))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@dataclass
class CliSite:
    """A small synthetic site with its cohorts built and its dataset prepared, for CLI tests.

    ``adapter`` is the site's adapter TOML (its URL, on PostgreSQL, in the env var ``env``);
    ``study`` a copy of examples/t2dm_hf/study.toml without images and omics; ``prepared`` the
    folder holding ``<prepared>/site_a``.  :meth:`clone` gives a private copy to damage.
    """

    backend: str
    base: Path
    adapter: Path
    study: Path
    prepared: Path
    url: str
    env: str | None

    def clone(self, tag: str) -> CliSite:
        """A copy of the site's database and adapter (DuckDB file copy, PostgreSQL TEMPLATE)."""
        import shutil

        base = Path(tempfile.mkdtemp(prefix=f"omopfl-{tag}-"))
        text = self.adapter.read_text()
        if self.backend == "duckdb":
            source = sa.engine.make_url(self.url).database
            shutil.copy2(source, base / "omop.duckdb")
            text = "\n".join(line for line in text.splitlines() if not line.startswith("duckdb_path"))
            text = text.replace("[database]", f'[database]\nduckdb_path = "{base / "omop.duckdb"}"')
            url, env = f"duckdb:///{base / 'omop.duckdb'}", None
        else:
            name = f"t_{tag}_{uuid.uuid4().hex[:8]}".lower()
            source = sa.engine.make_url(self.url).database
            admin = make_engine(PG_ADMIN_URL).execution_options(isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(sa.text(f'CREATE DATABASE "{name}" TEMPLATE "{source}"'))
            admin.dispose()
            url = str(sa.engine.make_url(self.url).set(database=name).render_as_string(hide_password=False))
            env = f"OMOPFL_TEST_{uuid.uuid4().hex[:8].upper()}_URL"
            os.environ[env] = url
            text = text.replace(f'"{self.env}"', f'"{env}"')
        adapter = base / "site_a.toml"
        adapter.write_text(text)
        return CliSite(self.backend, base, adapter, self.study, base / "prepared", url, env)


def cli_study_text(extra: str = "") -> str:
    """examples/t2dm_hf/study.toml with absolute cohort paths, no images or omics, and ``extra`` appended."""
    text = (ROOT / "examples" / "t2dm_hf" / "study.toml").read_text()
    return text.replace('"../../cohorts/', f'"{ROOT}/cohorts/').replace("enabled = true", "enabled = false") + extra


@pytest.fixture(scope="session")
def cli_site_factory(tmp_path_factory: pytest.TempPathFactory, database_factory):
    """``make("duckdb" | "postgresql")``: one :class:`CliSite` per backend, built once per session."""
    from omopfl.config import load_site
    from omopfl.prepare import prepare_site
    from omopfl.study import load_study
    from omopfl.synth import run_synth

    made: dict[str, CliSite] = {}

    def make(name: str) -> CliSite:
        if name in made:
            return made[name]
        url = database_factory(name, "clisite")
        base = tmp_path_factory.mktemp(f"cli_{name}")
        env = None
        kwargs: dict = {}
        if name == "postgresql":
            env = f"OMOPFL_TEST_{uuid.uuid4().hex[:8].upper()}_URL"
            os.environ[env] = url
            kwargs = {"pg_url": url, "pg_url_env": env}
        run_synth(base / "synth", n_sites=1, persons=[400], seed=3, image_share=0.0, omics_share=0.0,
                  progress=False, **kwargs)
        (base / "study.toml").write_text(cli_study_text())
        adapter = base / "synth" / "adapters" / "site_a.toml"
        site = load_site(adapter)
        engine = make_engine(site.database_url())
        try:
            prepare_site(engine, site, load_study(base / "study.toml"), base / "prepared")
        finally:
            engine.dispose()
        made[name] = CliSite(name, base, adapter, base / "study.toml", base / "prepared", site.database_url(), env)
        return made[name]

    return make


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, list[str]]:
    """Run ``omopfl`` in this process: ``(exit code, stdout, stderr lines)``."""
    capsys.readouterr()
    code = run_omopfl([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.strip()]


def serve_site(adapters, index: int, content, run_id: int, message_type: str, prepared: Path):
    """What a coordinator receives (the reply's content) from the site of ``adapters[index]`` (node
    ``index + 1``, its dataset in ``prepared``) for one crafted message: :func:`serve_at_site`."""
    from flwr.app import Context, RecordDict

    context = Context(run_id=run_id, node_id=index + 1,
                      node_config={"site-config": str(adapters[index]), "prepared-dir": str(prepared)},
                      state=RecordDict(), run_config={})
    return serve_at_site(content, context, message_type, run_id=run_id, message_id=f"m{run_id}-{index}",
                         node_id=index + 1).content
