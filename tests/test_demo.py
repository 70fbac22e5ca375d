"""The README's main command on the embedded default, end to end through the console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from omopfl.config import load_site

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_and_reports(tmp_path: Path) -> None:
    exe = str(Path(sys.executable).parent / "omopfl")
    out, adapters = tmp_path / "demo", tmp_path / "adapters"
    done = subprocess.run(
        [exe, "demo", "--out", str(out), "--adapters", str(adapters), "--sites", "2", "--study",
         str(ROOT / "examples" / "t2dm_hf" / "study.toml")],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "demo_report.json").read_text())
    assert [s["site"] for s in report["sites"]] == ["site_a", "site_b"]
    for synth, site in zip(report["synth"], report["sites"], strict=True):
        assert site["row_counts"]["person"] == synth["persons"]
        assert site["cdm_version"] == "5.4"
    assert "site_a: CDM 5.4" in done.stdout
    for synth in report["synth"]:  # the target cohort built in each site equals the generator's truth
        target = report["cohorts"][synth["site"]][0]
        assert target["cohort_id"] == 101 and target["person_count"] == synth["target_persons"]
        prepared = report["prepared"][synth["site"]]
        assert prepared["persons"] == synth["target_persons"] and prepared["validation"]["fatal_count"] == 0
        assert (Path(prepared["folder"]) / "manifest.json").is_file()
    stats = report["stats"]
    assert stats["sites"]["contributing"] == ["site_a", "site_b"]
    assert stats["global"]["persons"] == sum(s["target_persons"] for s in report["synth"])
    run_dir = Path(report["training"]["run_dir"])
    assert (run_dir / "model.npz").is_file() and (run_dir / "metrics.png").is_file()
    assert report["training"]["final"]["eval_auc"] > 0.5


def test_checked_in_adapters_match_the_demo_layout() -> None:
    """adapters/ holds the demo sites; they point where `omopfl demo` writes."""
    for name in ("site_a", "site_b", "site_c"):
        site = load_site(ROOT / "adapters" / f"{name}.toml")
        assert site.name == name
        assert site.duckdb_path.resolve() == (ROOT / "data" / "demo" / name / "omop.duckdb").resolve()
    example = load_site(ROOT / "examples" / "adapters" / "hospital_postgres.toml")
    assert example.url_env == "OMOPFL_HOSPITAL_URL" and example.duckdb_path is None
