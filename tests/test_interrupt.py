"""SIGINT and SIGKILL at random points of ``omopfl prepare`` and ``omopfl cohort build``, on both backends.

SIGINT: exit 130 and one line on stderr (or 0 if the command had finished).  Either signal: the previous
dataset (or the new, complete one) and the previous cohorts are intact.  The delay of each signal is
random (``OMOPFL_INTERRUPT_SEED`` fixes it) and printed on failure.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import ROOT, CliSite

from omopfl.config import load_site
from omopfl.db import make_engine, qualified
from omopfl.prepare import load_prepared

SEED = int(os.environ.get("OMOPFL_INTERRUPT_SEED", str(random.SystemRandom().randrange(10**6))))
RANDOM = random.Random(SEED)


@pytest.fixture(scope="module")
def site(backend_name, cli_site_factory) -> CliSite:
    return cli_site_factory(backend_name).clone("interrupt")


def _run(site: CliSite, args: list[str], sig: int | None, delay: float) -> tuple[int, str, bool]:
    """Start ``omopfl args``, send ``sig`` (None: none) after ``delay`` s; (exit code, stderr, still running?)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({site.env: site.url} if site.env else {})}
    process = subprocess.Popen([sys.executable, "-m", "omopfl.cli", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env=env, cwd=site.base)
    time.sleep(delay)
    running = sig is not None and process.poll() is None
    if running:
        process.send_signal(sig)
    _, err = process.communicate(timeout=300)
    return process.returncode, err, running


def _dataset_digest(folder: Path) -> str:
    prepared = load_prepared(folder)  # complete: its manifest's file hashes match the files
    for name, digest in prepared.manifest["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    return prepared.manifest["files"]["tabular.npz"]


def _cohort_state(site: CliSite) -> list[tuple]:
    config = load_site(site.adapter)
    engine = make_engine(site.url)
    try:
        with engine.connect() as conn:
            cohorts = conn.execute(sa.text(
                "SELECT cohort_definition_id, count(*), count(DISTINCT subject_id), min(cohort_start_date), "
                f"max(cohort_end_date) FROM {qualified(config.results_schema, 'cohort')} GROUP BY 1 ORDER BY 1")).all()
            definitions = conn.execute(sa.text(
                "SELECT cohort_definition_id, definition_hash, person_count, record_count FROM "
                f"{qualified(config.results_schema, 'cohort_definition')} ORDER BY 1")).all()
            rules = conn.execute(sa.text(
                f"SELECT cohort_definition_id, count(*) FROM {qualified(config.results_schema, 'cohort_inclusion')} "
                "GROUP BY 1 ORDER BY 1")).all()
    finally:
        engine.dispose()
    return [tuple(r) for r in (*cohorts, *definitions, *rules)]


def _check_signal_outcome(sig: int, code: int, err: str, running: bool, note: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    if not running:
        assert code == 0, (note, code, lines)
    elif sig == signal.SIGINT:
        assert code in (130, 0), (note, code, lines)  # 0: it finished while the signal was on its way
        if code == 130:
            assert len(lines) == 1 and lines[0].startswith("omopfl: error: interrupted"), (note, lines)
    else:
        assert code == -signal.SIGKILL, (note, code, lines)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_prepare_interrupted(site: CliSite, sig: int) -> None:
    out = site.base / "prepared"
    if not (out / "site_a").exists():
        started = time.perf_counter()
        code, err, _ = _run(site, ["prepare", "--site", str(site.adapter), "--study", str(site.study), "--out",
                                   str(out), "--json"], None, 0.0)
        assert code == 0, err
        site.prepare_seconds = time.perf_counter() - started  # type: ignore[attr-defined]
    before = _dataset_digest(out / "site_a")
    duration = getattr(site, "prepare_seconds", 10.0)
    delay = RANDOM.uniform(0.2, max(1.0, duration))
    note = f"seed {SEED}, signal after {delay:.2f} s of a ~{duration:.1f} s run"
    code, err, running = _run(site, ["prepare", "--site", str(site.adapter), "--study", str(site.study), "--out",
                                     str(out), "--json"], sig, delay)
    _check_signal_outcome(sig, code, err, running, note)
    after = _dataset_digest(out / "site_a")
    assert after == before, note  # same data: the previous dataset, or an identical complete new one
    if sig == signal.SIGINT:
        assert not list(out.glob(".site_a.tmp*")), note  # nothing half-written left behind


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_cohort_build_interrupted(site: CliSite, sig: int) -> None:
    cohorts = [str(ROOT / "cohorts" / "incident_t2dm.yaml"), str(ROOT / "cohorts" / "heart_failure.yaml")]
    args = ["cohort", "build", *cohorts, "--site", str(site.adapter), "--replace", "--json"]
    before = _cohort_state(site)
    assert before, "the site has cohorts to lose"
    if not hasattr(site, "build_seconds"):
        started = time.perf_counter()
        code, err, _ = _run(site, args, None, 0.0)
        assert code == 0, err
        site.build_seconds = time.perf_counter() - started  # type: ignore[attr-defined]
        assert _cohort_state(site) == before
    delay = RANDOM.uniform(0.2, max(1.0, site.build_seconds))  # type: ignore[attr-defined]
    note = f"seed {SEED}, signal after {delay:.2f} s of a ~{site.build_seconds:.1f} s run"  # type: ignore[attr-defined]
    code, err, running = _run(site, args, sig, delay)
    _check_signal_outcome(sig, code, err, running, note)
    assert _cohort_state(site) == before, note


def test_an_interrupt_during_an_import_waits_for_the_import(tmp_path: Path) -> None:
    """Ctrl-C while a module is being imported (a native extension's init: DuckDB's nanobind binding aborts
    the whole process if an exception is raised inside it) is raised just after the import, not inside it."""
    module = tmp_path / "slow_module.py"
    module.write_text("import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(0.2)\nDONE = True\n")
    code = ("import signal, sys, time\nfrom omopfl import cli\nsignal.signal(signal.SIGINT, cli._on_sigint)\n"
            f"sys.path.insert(0, {str(tmp_path)!r})\n"
            "try:\n    import slow_module\n    print('imported', slow_module.DONE, flush=True)\n    time.sleep(5)\n"
            "    print('never interrupted')\n"
            "except KeyboardInterrupt:\n"
            "    print('interrupted after the import' if 'slow_module' in sys.modules else 'inside the import')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["imported True", "interrupted after the import"], done.stdout
