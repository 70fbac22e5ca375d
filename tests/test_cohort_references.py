"""Cohort references in a study (issue 13), on DuckDB and PostgreSQL, through the CLI.

* an ATLAS export as it is (a bare CIRCE expression, no id): the study gives the id;
* a cohort already built at the site (``omopfl cohort build --id``), named by id only;
* each gives the same prepared dataset as the study naming omopfl's own YAML definitions;
* what cannot be served is one line naming the key and what to do.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, CliSite, cli_study_text, run_cli

from omopfl.cohort import load_definition
from omopfl.prepare import load_prepared


@pytest.fixture(scope="module", params=["duckdb", "postgresql"])
def site(request, cli_site_factory) -> CliSite:
    return cli_site_factory(request.param)


def _study(tmp_path: Path, cohorts: str) -> Path:
    text = re.sub(r"\[cohorts\]\n(.*\n){2}", lambda _m: f"[cohorts]\n{cohorts}\n", cli_study_text(), count=1)
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


def _atlas_export(tmp_path: Path, name: str) -> Path:
    """The CIRCE expression of one of omopfl's cohorts, written as ATLAS exports it (no id, JSON)."""
    expression = load_definition(ROOT / "cohorts" / name).expression
    path = tmp_path / (Path(name).stem + ".json")
    path.write_text(json.dumps(expression))
    assert "id" not in expression
    return path


def _same_dataset(a: Path, b: Path) -> None:
    left, right = load_prepared(a), load_prepared(b)
    assert left.feature_names == right.feature_names
    np.testing.assert_array_equal(left.y, right.y)
    np.testing.assert_allclose(left.x, right.x, equal_nan=True)


def test_an_atlas_export_with_the_id_given_by_the_study(site: CliSite, tmp_path: Path, capsys) -> None:
    clone = site.clone("atlasref")
    target = _atlas_export(tmp_path, "incident_t2dm.yaml")
    outcome = _atlas_export(tmp_path, "heart_failure.yaml")
    study = _study(tmp_path, f'target = {{file = "{target}", id = 301}}\noutcome = {{file = "{outcome}", id = 302}}')
    code, _, err = run_cli(["prepare", "--site", clone.adapter, "--study", study, "--out", tmp_path / "prepared"],
                           capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "prepared" / "site_a" / "manifest.json").read_text())
    assert manifest["cohorts"]["target"]["id"] == 301 and manifest["cohorts"]["outcome"]["id"] == 302
    _same_dataset(tmp_path / "prepared" / "site_a", site.prepared / "site_a")

    # the same export without an id: one line saying how to give it
    bare = _study(tmp_path, f'target = "{target}"\noutcome = {{file = "{outcome}", id = 302}}')
    code, _, err = run_cli(["prepare", "--site", clone.adapter, "--study", bare, "--out", tmp_path / "p2"], capsys)
    assert code == 5 and len(err) == 1, err
    assert "incident_t2dm.json carries no cohort id" in err[0] and 'target = {file = "incident_t2dm.json", id' in err[0]


def test_a_cohort_built_at_the_site_by_id(site: CliSite, tmp_path: Path, capsys) -> None:
    clone = site.clone("siteref")
    study = _study(tmp_path, "target = {cohort_id = 7101}\noutcome = {cohort_id = 7102}")
    out = tmp_path / "prepared"
    code, _, err = run_cli(["prepare", "--site", clone.adapter, "--study", study, "--out", out], capsys)
    assert code == 5 and len(err) == 1, err
    assert "cohort id 7101, which is not built" in err[0] and "omopfl cohort build" in err[0] and "--id 7101" in err[0]
    assert not (out / "site_a").exists()
    for name, cohort_id in (("incident_t2dm.yaml", 7101), ("heart_failure.yaml", 7102)):
        code, _, err = run_cli(["cohort", "build", ROOT / "cohorts" / name, "--site", clone.adapter,
                                "--id", str(cohort_id)], capsys)
        assert code == 0, err
    code, _, err = run_cli(["prepare", "--site", clone.adapter, "--study", study, "--out", out], capsys)
    assert code == 0, err
    manifest = json.loads((out / "site_a" / "manifest.json").read_text())
    assert manifest["cohorts"]["target"]["id"] == 7101 and not manifest["cohorts"]["target"]["rebuilt"]
    _same_dataset(out / "site_a", site.prepared / "site_a")


@pytest.mark.parametrize(("cohorts", "says"), [
    ("target = {cohort_id = 5, file = \"x.json\"}\noutcome = {cohort_id = 6}", "either cohort_id"),
    ("target = {cohort_id = 5}\noutcome = {cohort_id = 5}", "has the target cohort's id"),
    ("target = {id = 5}\noutcome = {cohort_id = 6}", "needs file"),
    ("target = {cohort_id = 0}\noutcome = {cohort_id = 6}", "[cohorts.target] cohort_id must be between 1"),
    ("target = {cohort_id = 5, colour = 1}\noutcome = {cohort_id = 6}", "colour is not a known key"),
    ("target = 5\noutcome = {cohort_id = 6}", "a definition file"),
])
def test_bad_cohort_references_are_one_line(site: CliSite, tmp_path: Path, capsys, cohorts: str, says: str) -> None:
    if site.backend != "duckdb":
        pytest.skip("parsing only: one backend is enough")
    study = _study(tmp_path, cohorts)
    code, _, err = run_cli(["prepare", "--site", site.adapter, "--study", study, "--out", tmp_path / "p"], capsys)
    assert code == 2 and len(err) == 1 and says in err[0], err
