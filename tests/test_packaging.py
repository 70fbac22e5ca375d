"""The wheel works anywhere: build it, install it into a fresh virtual environment, run the main job.

Installing every dependency again costs pip minutes here, so the fresh environment reaches the project
environment's already-installed dependencies through a ``.pth`` line, and the wheel is installed into it
with ``--no-deps``.  The ``omopfl`` package itself comes from the wheel: the test proves it (its
``__file__`` is inside the fresh environment, the checkout is on no ``sys.path`` entry) before running
``omopfl demo`` in an empty folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The wheel built from a copy of the checkout's sources (no build/ or egg-info left in the checkout)."""
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("omopfl", "examples", "cohorts", "sql"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    dist = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--disable-pip-version-check", "-w", str(dist), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    wheels = list(dist.glob("omopfl-*.whl"))
    assert len(wheels) == 1
    return wheels[0], done.stdout + done.stderr


def test_the_build_log_is_clean(wheel: tuple[Path, str]) -> None:
    """No setuptools deprecation (the license is an SPDX string) and no package-discovery warning."""
    _, log = wheel
    assert "BuildBackendWarning" not in log and "deprecated" not in log.lower(), log[-3000:]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"


def test_the_wheel_carries_every_example_study_and_cohort(wheel: tuple[Path, str]) -> None:
    with zipfile.ZipFile(wheel[0]) as archive:
        names = set(archive.namelist())
    for path in [*ROOT.glob("examples/*/*.toml"), *ROOT.glob("cohorts/*.yaml"), *ROOT.glob("cohorts/*.json")]:
        assert f"omopfl/bundled/{path.relative_to(ROOT).as_posix()}" in names, path
    assert {"omopfl/federation/coordinator/run_view.html", "omopfl/federation/coordinator/run_view.js"} <= names
    queries = sorted(ROOT.glob("sql/*.sql"))
    assert queries, "the checkout has no sql/*.sql"
    for path in queries:
        assert f"omopfl/bundled/sql/{path.name}" in names, path
    assert not any(n.startswith(("tests/", "bench/", "adapters/")) for n in names)


def test_wheel_in_a_fresh_venv_runs_the_demo_in_an_empty_folder(wheel: tuple[Path, str], tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    # the project environment's dependencies (not its omopfl: that is an editable finder a .pth line never runs)
    (purelib / "omopfl_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                           "--disable-pip-version-check", "--quiet", str(wheel[0])],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMOPFL_CACHE_DIR=str(tmp_path / "cache"), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    probe = subprocess.run(
        [str(python), "-c", "import json, sys, omopfl, omopfl.db as db, omopfl.resources as r; "
                            "print(json.dumps({'file': omopfl.__file__, 'root': str(r.resource_root()), "
                            "'sql': str(db.SQL_DIR), 'query': db.sql_text('schema_exists'), 'path': sys.path}))"],
        cwd=empty, env=env, capture_output=True, text=True, check=True)
    where = json.loads(probe.stdout)
    assert Path(where["file"]).is_relative_to(purelib), where["file"]
    assert Path(where["root"]) == purelib / "omopfl" / "bundled"
    assert Path(where["sql"]) == purelib / "omopfl" / "bundled" / "sql"
    assert where["query"].startswith("SELECT count(*) FROM information_schema.schemata")
    assert not any(p and Path(p).resolve() == ROOT for p in where["path"]), where["path"]

    demo = subprocess.run([str(venv / "bin" / "omopfl"), "demo", "--sites", "2"], cwd=empty, env=env,
                          capture_output=True, text=True, timeout=900)
    assert demo.returncode == 0, demo.stderr[-3000:]
    report = json.loads((empty / "data" / "demo" / "demo_report.json").read_text())
    assert [s["site"] for s in report["sites"]] == ["site_a", "site_b"]
    assert sorted(p.name for p in (empty / "adapters").glob("*.toml")) == ["site_a.toml", "site_b.toml"]
    run_dir = empty / report["training"]["run_dir"]
    assert (run_dir / "model.npz").is_file() and (run_dir / "report.md").is_file()
    assert report["training"]["final"]["eval_auc"] > 0.5
    # the study it prepared for is the wheel's copy
    manifest = json.loads((empty / "data" / "demo" / "prepared" / "site_a" / "manifest.json").read_text())
    shipped = (purelib / "omopfl" / "bundled" / "examples" / "t2dm_hf" / "study.toml").read_text()
    assert manifest["study_hash"] == hashlib.sha256(shipped.encode()).hexdigest()

    copied = subprocess.run([str(venv / "bin" / "omopfl"), "examples", "--out", "mine"], cwd=empty, env=env,
                            capture_output=True, text=True, timeout=120)
    assert copied.returncode == 0, copied.stderr
    assert (empty / "mine" / "examples" / "t2dm_hf" / "study.toml").read_text() == shipped
    again = subprocess.run([str(venv / "bin" / "omopfl"), "examples", "--out", "mine"], cwd=empty, env=env,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and again.stderr.startswith("omopfl: error:") and "already exists" in again.stderr
