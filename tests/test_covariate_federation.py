"""Eunomia GiBleed split into three DuckDB sites: the default covariate set, federated discovery
(``query.covariates`` through each site's trust boundary) and federated training on the sparse covariates,
end to end in process (Flower's wire format, no network).

Each site is a copy of Eunomia keeping the persons with ``person_id % 3 == k`` (others removed from
``person`` and ``observation_period``, so they enter no cohort).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from omopfl import policy
from omopfl.config import load_site
from omopfl.covariate_sets import read_covariate_list
from omopfl.covariates import COVARIATES_FILE, load_matrix, persons_per_covariate
from omopfl.db import make_engine
from omopfl.errors import ConfigError, FederationError
from omopfl.federation import codec
from omopfl.federation.local import run_discovery
from omopfl.prepare import prepare_site
from omopfl.study import load_study

ROOT = Path(__file__).resolve().parents[1]
SITES = ("eu_a", "eu_b", "eu_c")
K = {"eu_a": 10, "eu_b": 10, "eu_c": 25}  # each site's own min_cell_count


def _study_text(extra: str = "") -> str:
    text = (ROOT / "examples" / "eunomia_gibleed" / "study.toml").read_text()
    text = text.replace('"../../cohorts/', f'"{ROOT}/cohorts/')
    text = text.replace('[model]\nkind = "logistic"', '[model]\nkind = "logistic"\nl2 = 0.0001')
    text = text.replace("rounds = 3", "rounds = 3\nlearning_rate = 0.05\nbatch_size = 128")
    return text + '\n[covariates]\nset = "default"\n' + extra


def _prepare(base: Path, study_path: Path) -> None:
    study = load_study(study_path)
    for name in SITES:
        site = load_site(base / "adapters" / f"{name}.toml")
        policy.approve(site, study)
        engine = make_engine(site.database_url())
        try:
            prepare_site(engine, site, study, base / "prepared")
        finally:
            engine.dispose()


@pytest.fixture(scope="module")
def eunomia_sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from omopfl.eunomia import load_eunomia, write_adapter

    base = tmp_path_factory.mktemp("covfed")
    (base / "adapters").mkdir()
    first = base / "eu_a" / "omop.duckdb"
    first.parent.mkdir()
    engine = make_engine(f"duckdb:///{first}")
    with engine.begin() as conn:
        load_eunomia(conn, cdm_schema="cdm")
    engine.dispose()
    for name in SITES:
        path = base / name / "omop.duckdb"
        if name != "eu_a":
            path.parent.mkdir()
            shutil.copy2(first, path)
    for k, name in enumerate(SITES):
        path = base / name / "omop.duckdb"
        engine = make_engine(f"duckdb:///{path}")
        with engine.begin() as conn:
            for table in ("person", "observation_period"):
                conn.execute(sa.text(f"DELETE FROM cdm.{table} WHERE person_id % 3 <> {k}"))
        engine.dispose()
        adapter = write_adapter(base / "adapters" / f"{name}.toml", name, duckdb_path=path)
        adapter.write_text(adapter.read_text().replace("min_cell_count = 10", f"min_cell_count = {K[name]}"))
        assert load_site(adapter).min_cell_count == K[name]
    (base / "discovery.toml").write_text(_study_text())
    _prepare(base, base / "discovery.toml")
    return {"base": base, "adapters": [base / "adapters" / f"{n}.toml" for n in SITES]}


def _persons(base: Path, name: str) -> dict[int, int]:
    return persons_per_covariate(load_matrix(base / "prepared" / name / COVARIATES_FILE))


def test_discovery_releases_only_ids_held_by_k_persons_per_site(eunomia_sites, tmp_path: Path) -> None:
    base = eunomia_sites["base"]
    # a hostile coordinator asks for covariates of a single person: each site keeps its own k
    result = run_discovery(base / "discovery.toml", eunomia_sites["adapters"], base / "prepared",
                           out=tmp_path / "cov.csv", min_sites=1, min_persons=1, mode="inprocess")
    assert set(result["sites"]["answered"]) == set(SITES) and not result["sites"]["failed"]
    released_anywhere = {int(c) for c in result["sites_per_covariate"]}
    for name in SITES:
        counts = _persons(base, name)
        allowed = {c for c, n in counts.items() if n >= K[name]}
        assert any(n < K[name] for n in counts.values()), "the test needs covariates below k at every site"
        assert result["sites"]["answered"][name] == len(allowed)
    # every released id is held by >= k persons at each site that released it: recount from the prepared data
    per_site = {name: {c for c, n in _persons(base, name).items() if n >= K[name]} for name in SITES}
    for c, n_sites in result["sites_per_covariate"].items():
        assert n_sites == sum(int(c) in ids for ids in per_site.values())
    assert released_anywhere == set().union(*per_site.values())
    # site eu_c (k = 25) releases fewer ids than it would at k = 10
    c_counts = _persons(base, "eu_c")
    assert len(per_site["eu_c"]) < sum(1 for n in c_counts.values() if n >= 10)


def test_discovery_keeps_ids_of_enough_sites_and_training_uses_them(eunomia_sites, tmp_path: Path) -> None:
    from omopfl.federation.local import run_training

    base = eunomia_sites["base"]
    out = base / "covariates.csv"
    result = run_discovery(base / "discovery.toml", eunomia_sites["adapters"], base / "prepared", out=out,
                           min_sites=3, mode="inprocess")
    kept = result["covariates"]
    assert kept and all(result["sites_per_covariate"][str(c)] == 3 for c in kept)
    assert len(kept) > 20, len(kept)
    ids, _digest = read_covariate_list(out, "test")
    assert list(ids) == sorted(kept)
    analyses = {c % 1000 for c in kept}
    assert {1, 3, 4, 7, 210, 212, 410, 412} <= analyses, analyses  # demographics, condition and drug group eras
    assert 1118084410 in kept  # celecoxib (the target drug) in the long-term drug group era window
    assert 8507001 in kept and 8532001 in kept  # male, female (FeatureExtraction's ids)
    rows = out.read_text().splitlines()
    assert rows[0] == "covariate_id,covariate_name,analysis_id,concept_id,sites"
    assert any(r.startswith("8507001,DemographicsGender: concept 8507,1,8507,3") for r in rows)

    # the final study names the list: its hash covers the list; sites approve and prepare it
    final = base / "final.toml"
    final.write_text(_study_text('list = "covariates.csv"\n'))
    study = load_study(final)
    assert study.covariates is not None and study.covariates.covariate_ids == tuple(sorted(kept))
    assert study.hash != load_study(base / "discovery.toml").hash
    assert codec.training_settings(study)["model-covariates"] == len(kept)
    assert "model-covariates" not in codec.training_settings(load_study(base / "discovery.toml"))
    summary = policy.study_summary(study, load_site(eunomia_sites["adapters"][2]))
    assert summary["covariates"]["covariates"] == len(kept) and summary["covariates"]["list"] == "covariates.csv"
    assert "at least 25 persons" in summary["covariates"]["discovery_releases"]
    prepared = base / "prepared_final"
    for name in SITES:
        site = load_site(base / "adapters" / f"{name}.toml")
        policy.approve(site, study)
        engine = make_engine(site.database_url())
        try:
            prepare_site(engine, site, study, prepared)
        finally:
            engine.dispose()
        cm = load_matrix(prepared / name / COVARIATES_FILE)
        assert list(cm.covariate_ids) == sorted(kept)
        manifest = json.loads((prepared / name / "manifest.json").read_text())
        assert manifest["covariates"]["covariates"] == len(kept) and manifest["covariates"]["fixed_list"]
        assert cm.matrix.shape[0] == manifest["persons"]

    run_dir = tmp_path / "run"
    manifest = run_training(final, eunomia_sites["adapters"], prepared, mode="inprocess", out_dir=run_dir,
                            rounds=3)
    assert manifest["sites"] == list(SITES)
    with np.load(run_dir / "model.npz") as saved:
        weight = saved["linear.weight"]
    n_tabular = len(json.loads((run_dir / "features.json").read_text())["feature_names"])
    assert weight.shape == (1, n_tabular + len(kept))
    assert np.abs(weight[0, n_tabular:]).max() > 1e-3  # the covariate weights were trained
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert rounds[-1]["train_loss"] is not None and np.isfinite(rounds[-1]["train_loss"])


def test_a_changed_list_is_another_study(eunomia_sites, tmp_path: Path) -> None:
    base = eunomia_sites["base"]
    (tmp_path / "covariates.csv").write_text("covariate_id,covariate_name\n8507001,m\n8532001,f\n")
    (tmp_path / "study.toml").write_text(_study_text('list = "covariates.csv"\n'))
    first = load_study(tmp_path / "study.toml").hash
    (tmp_path / "covariates.csv").write_text("covariate_id,covariate_name\n8507001,m\n")
    assert load_study(tmp_path / "study.toml").hash != first
    with pytest.raises(ConfigError, match="list is already set"):
        run_discovery(tmp_path / "study.toml", eunomia_sites["adapters"], base / "prepared",
                      out=tmp_path / "x.csv", mode="inprocess")


def test_unapproved_study_and_release_rule_at_the_site(eunomia_sites, tmp_path: Path) -> None:
    from omopfl import release

    base = eunomia_sites["base"]
    other = tmp_path / "other.toml"  # another study (other windows): no site approved it
    other.write_text(_study_text().replace('set = "default"', 'set = "default"\nlong_term_days = 180'))
    with pytest.raises(FederationError, match=r"no site answered.*study_not_approved"):
        run_discovery(other, eunomia_sites["adapters"], base / "prepared", out=tmp_path / "x.csv",
                      min_sites=1, mode="inprocess")
    assert release.covariate_ids({1: 9, 2: 10, 3: 11}, 10) == [2, 3]
    assert release.covariate_ids({1: 9, 2: 10, 3: 11}, 10, requested=1) == [2, 3]  # never below the site's k
    assert release.covariate_ids({1: 9, 2: 10, 3: 11}, 10, requested=11) == [3]
    with pytest.raises(release.ReleaseViolation):
        release.check_reply(codec.COVARIATES_QUERY, {"omopfl.covariates": {"covariate-ids": [1], "persons": [12]}}, 10)


def test_cli_covariates(eunomia_sites, tmp_path: Path, capsys) -> None:
    from omopfl.cli import main

    base = eunomia_sites["base"]
    args = ["covariates", "--study", str(base / "discovery.toml"), "--prepared", str(base / "prepared"),
            "--out", str(tmp_path / "cov.csv"), "--min-sites", "2", "--mode", "inprocess"]
    for adapter in eunomia_sites["adapters"]:
        args += ["--site", str(adapter)]
    main(args)
    out = capsys.readouterr().out
    assert "eu_c released" in out and 'list = "cov.csv"' in out
    assert read_covariate_list(tmp_path / "cov.csv", "test")[0]
    with pytest.raises(SystemExit) as info:
        main([*args[:-2], "--mode", "nowhere"])
    assert info.value.code == 2 and "--mode must be inprocess or deployment" in capsys.readouterr().err


def test_discovery_on_a_loopback_deployment(eunomia_sites, tmp_path: Path) -> None:
    base = eunomia_sites["base"]
    inprocess = run_discovery(base / "discovery.toml", eunomia_sites["adapters"], base / "prepared",
                              out=tmp_path / "a.csv", min_sites=2, mode="inprocess")
    deployed = run_discovery(base / "discovery.toml", eunomia_sites["adapters"], base / "prepared",
                             out=tmp_path / "b.csv", min_sites=2, mode="deployment", timeout=120)
    assert deployed["covariates"] == inprocess["covariates"]
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()


def test_the_discovery_server_imports_no_patient_data_code() -> None:
    import subprocess
    import sys

    forbidden = ("omopfl.prepare", "omopfl.features", "omopfl.covariates", "omopfl.db", "omopfl.cohort",
                 "omopfl.config", "omopfl.federation.site.statistics", "omopfl.federation.site.covariates",
                 "sqlalchemy", "duckdb", "psycopg", "psycopg2", "torch")
    code = "import json, sys; import omopfl.federation.coordinator.discovery; print(json.dumps(sorted(sys.modules)))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                       text=True).stdout)
    assert not [m for m in loaded if any(m == f or m.startswith(f + ".") for f in forbidden)]
