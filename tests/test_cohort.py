"""Cohorts built inside the database, on DuckDB and PostgreSQL, with both CIRCE translators.

Real OHDSI cohorts (CohortGenerator's celecoxib test cohorts, PhenotypeLibrary GI-bleed cohorts)
run on OHDSI's Eunomia GiBleed; the hand-written YAML cohorts run on synthetic sites whose
generator planted the answer.
"""

from __future__ import annotations

import json
import os
import tarfile
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import Site, run_omopfl

from omopfl.cohort import (
    assign_ids,
    build_cohorts,
    load_definition,
    mask_count,
    render_sql,
    show_cohort,
)
from omopfl.config import SiteConfig, load_site
from omopfl.db import make_engine, qualified
from omopfl.errors import DatabaseError, DataError

ROOT = Path(__file__).resolve().parents[1]
COHORTS = ROOT / "cohorts"
# Reference data written by others lives beside the checkout (../shared/data), never in the repo.
SHARED = Path(os.environ.get("OMOPFL_SHARED_DATA", ROOT.parent / "shared" / "data")) / "ohdsi-cohorts"

# OHDSI CohortGenerator's celecoxib test cohorts on Eunomia GiBleed, persons (= records: first event only).
# Reference: CohortGenerator's cohorts generated on Eunomia, as published by HADES users
# (getCohortCounts on Eunomia GiBleed).
CELECOXIB_REFERENCE = {"celecoxib": 1800, "celecoxibAge40": 569, "celecoxibAge40Male": 266,
                       "celecoxibCensored": 1750}
# PhenotypeLibrary GI-bleed cohorts on Eunomia: (persons, records).  Cross-checked between both
# translators and both backends; 482 also against the hand-written query in test_pl_482_by_hand.
GI_BLEED_PHENOTYPES = {77: (391, 391), 299: (479, 479), 482: (479, 479), 1197: (1015, 1281)}




def _shared(name: str) -> Path:
    path = SHARED / name
    if not path.exists():
        pytest.skip(f"reference cohorts not present at {SHARED} (shared/data is only on developer machines)")
    return path


def _cohort_rows(site: Site, cohort_id: int) -> list[tuple]:
    with site.engine.connect() as conn:
        table = qualified(site.config.results_schema, "cohort")
        return [tuple(r) for r in conn.execute(sa.text(
            f"SELECT subject_id, cohort_start_date, cohort_end_date FROM {table}"
            " WHERE cohort_definition_id = :id ORDER BY 1, 2, 3"), {"id": cohort_id})]


# ----------------------------------------------------------------------------- real cohorts on Eunomia
@pytest.mark.parametrize("translator", ["duckcdm", "circepy"])
def test_celecoxib_cohorts_match_reference(eunomia_site: Site, translator: str) -> None:
    names = list(CELECOXIB_REFERENCE)
    definitions = [load_definition(_shared(f"cohortgenerator_{name}.json")) for name in names]
    first_id = 1 if translator == "duckcdm" else 11
    results = build_cohorts(eunomia_site.engine, eunomia_site.config, assign_ids(definitions, first_id),
                            replace=True, translator=translator)
    got = {name: r.person_count for name, r in zip(names, results, strict=True)}
    assert got == CELECOXIB_REFERENCE
    assert all(r.record_count == r.person_count for r in results)


def test_translators_agree_row_for_row(eunomia_site: Site) -> None:
    definition = load_definition(_shared("cohortgenerator_celecoxibCensored.json"))
    build_cohorts(eunomia_site.engine, eunomia_site.config, [(definition, 21)], replace=True)
    build_cohorts(eunomia_site.engine, eunomia_site.config, [(definition, 22)], replace=True, translator="circepy")
    rows_duckcdm, rows_circepy = _cohort_rows(eunomia_site, 21), _cohort_rows(eunomia_site, 22)
    assert len(rows_duckcdm) == 1750
    assert rows_duckcdm == rows_circepy


@pytest.fixture(scope="module")
def phenotype_files(tmp_path_factory) -> dict[int, Path]:
    archive = _shared("phenotypelibrary_cohorts.tgz")
    folder = tmp_path_factory.mktemp("pl")
    wanted = {f"cohorts/{i}.json" for i in GI_BLEED_PHENOTYPES}
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.lstrip("./") in wanted]
        tar.extractall(folder, members=members, filter="data")
    return {int(p.stem): p for p in (folder / "cohorts").glob("*.json")}


@pytest.mark.parametrize("translator", ["duckcdm", "circepy"])
def test_phenotype_library_gi_bleed(eunomia_site: Site, phenotype_files, translator: str) -> None:
    offset = 0 if translator == "duckcdm" else 10_000
    requests = [(load_definition(phenotype_files[i]), i + offset) for i in sorted(GI_BLEED_PHENOTYPES)]
    results = build_cohorts(eunomia_site.engine, eunomia_site.config, requests, replace=True, translator=translator)
    got = {r.cohort_id - offset: (r.person_count, r.record_count) for r in results}
    assert got == GI_BLEED_PHENOTYPES


def test_pl_482_by_hand(eunomia_site: Site, phenotype_files) -> None:
    """An independent check: GI hemorrhage (192671 and descendants) persons, counted by hand in SQL."""
    build_cohorts(eunomia_site.engine, eunomia_site.config, [(load_definition(phenotype_files[482]), 482)],
                  replace=True)
    cdm = eunomia_site.config.cdm_schema
    with eunomia_site.engine.connect() as conn:
        by_hand = conn.execute(sa.text(
            f"SELECT count(DISTINCT co.person_id) FROM {qualified(cdm, 'condition_occurrence')} co "
            f"JOIN {qualified(cdm, 'concept_ancestor')} ca ON ca.descendant_concept_id = co.condition_concept_id "
            f"JOIN {qualified(cdm, 'observation_period')} op ON op.person_id = co.person_id "
            "AND co.condition_start_date BETWEEN op.observation_period_start_date AND op.observation_period_end_date "
            "WHERE ca.ancestor_concept_id = 192671")).scalar_one()
        built = len({r[0] for r in _cohort_rows(eunomia_site, 482)})
    assert built == by_hand == 479


def test_attrition_is_recorded_and_masked(eunomia_site: Site) -> None:
    definition = load_definition(_shared("cohortgenerator_celecoxibAge40Male.json"))
    build_cohorts(eunomia_site.engine, eunomia_site.config, [(definition, 31)], replace=True)
    with eunomia_site.engine.connect() as conn:
        detail = show_cohort(conn, eunomia_site.config, 31)
        strict = SiteConfig(**{**eunomia_site.config.__dict__, "min_cell_count": 300})
        masked = show_cohort(conn, strict, 31)
    assert detail.base_count == 1800 and detail.final_count == 266
    assert [r.persons_passing for r in detail.rules] == [569, 894]
    assert [r.name for r in detail.rules] == [r[0] for r in definition.inclusion_rules]
    assert masked.final_count == "<300" and masked.summary.persons == "<300"
    assert masked.rules[0].persons_passing == 569  # at or above the threshold stays exact


# ----------------------------------------------------------------------------- synthetic truth
@pytest.mark.parametrize("translator", ["duckcdm", "circepy"])
def test_incident_t2dm_equals_generator_truth(synth_site: Site, translator: str) -> None:
    definition = load_definition(COHORTS / "incident_t2dm.yaml")
    (result,) = build_cohorts(synth_site.engine, synth_site.config, [(definition, 101)], replace=True,
                              translator=translator)
    assert result.person_count == synth_site.truth["target_persons"] > 0
    assert result.record_count == result.person_count


def test_yaml_cohort_with_rules_and_era_exit(synth_site: Site) -> None:
    definition = load_definition(COHORTS / "t2dm_metformin_new_users.yaml")
    (result,) = build_cohorts(synth_site.engine, synth_site.config, [(definition, 103)], replace=True)
    with synth_site.engine.connect() as conn:
        detail = show_cohort(conn, SiteConfig(**{**synth_site.config.__dict__, "min_cell_count": 1}), 103)
    assert [r.name for r in detail.rules] == [
        "type 2 diabetes before or within a year of index", "no insulin glargine in the prior 365 days", "adults"]
    assert detail.final_count == result.person_count > 0
    assert detail.base_count >= result.person_count


def test_translated_sql_is_cached(tmp_path: Path, monkeypatch) -> None:
    import omopfl.cohort as cohort

    monkeypatch.setenv("OMOPFL_CACHE_DIR", str(tmp_path))
    definition = load_definition(COHORTS / "incident_t2dm.yaml")
    first = render_sql(definition, "postgresql", "cdm", "cdm", "results", 101)
    assert len(list((tmp_path / "cohort_sql").glob("*.json"))) == 1

    def boom(*args, **kwargs):
        raise AssertionError("translator called although the SQL was cached")

    monkeypatch.setattr(cohort, "_translate_duckcdm", boom)
    assert render_sql(definition, "postgresql", "cdm", "cdm", "results", 101) == first
    with pytest.raises(AssertionError):  # another dialect is another cache entry
        render_sql(definition, "duckdb", "cdm", "cdm", "results", 101)


# ----------------------------------------------------------------------------- bad input
def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_malformed_json(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"not valid JSON \(line 1"):
        load_definition(_write(tmp_path, "bad.json", '{"PrimaryCriteria": '))


def test_unsupported_criterion(tmp_path: Path) -> None:
    doc = {"ConceptSets": [], "PrimaryCriteria": {"CriteriaList": [{"FooBar": {"CodesetId": 0}}]}}
    with pytest.raises(DataError, match="unsupported criterion 'FooBar'"):
        load_definition(_write(tmp_path, "foo.json", json.dumps(doc)))


def test_unsupported_nested_criterion_is_caught_by_the_translator(tmp_path: Path) -> None:
    doc = json.loads((SHARED / "cohortgenerator_celecoxib.json").read_text()) if SHARED.exists() else None
    if doc is None:
        pytest.skip("reference cohorts not present")
    doc["InclusionRules"] = [{"name": "x", "expression": {"Type": "ALL", "CriteriaList": [
        {"Criteria": {"FooBar": {}}, "StartWindow": {"Start": {"Coeff": -1}, "End": {"Coeff": 1}},
         "Occurrence": {"Type": 2, "Count": 1}}], "DemographicCriteriaList": [], "Groups": []}}]
    definition = load_definition(_write(tmp_path, "nested.json", json.dumps(doc)))
    with pytest.raises(DataError, match="cannot translate"):
        render_sql(definition, "duckdb", "cdm", "cdm", "results", 5, use_cache=False)


def test_yaml_errors_name_the_key(tmp_path: Path) -> None:
    text = (COHORTS / "incident_t2dm.yaml").read_text()
    with pytest.raises(DataError, match=r"entry.events\[0\].condition_occurrence: unknown concept set 'nope'"):
        load_definition(_write(tmp_path, "a.yaml", text.replace(
            "{condition_occurrence: type 2 diabetes mellitus, first: true}", "{condition_occurrence: nope}")))
    with pytest.raises(DataError, match="top level: unknown key 'colapse_days'"):
        load_definition(_write(tmp_path, "b.yaml", text + "colapse_days: 3\n"))
    with pytest.raises(DataError, match="not valid YAML"):
        load_definition(_write(tmp_path, "c.yaml", "name: [unclosed"))


def test_unknown_concept_ids(synth_site: Site, tmp_path: Path) -> None:
    text = (COHORTS / "incident_t2dm.yaml").read_text().replace("concept_id: 201826", "concept_id: 999999991")
    definition = load_definition(_write(tmp_path, "unknown.yaml", text))
    with pytest.raises(DataError, match=r"has no concept id known to the vocabulary.*999999991"):
        build_cohorts(synth_site.engine, synth_site.config, [(definition, 150)])


def test_existing_id_is_refused_and_kept(synth_site: Site) -> None:
    definition = load_definition(COHORTS / "incident_t2dm.yaml")
    build_cohorts(synth_site.engine, synth_site.config, [(definition, 160)], replace=True)
    before = _cohort_rows(synth_site, 160)
    other = load_definition(COHORTS / "heart_failure.yaml")
    with pytest.raises(DataError, match=r"cohort id 160 already exists .*--replace"):
        build_cohorts(synth_site.engine, synth_site.config, [(other, 160)])
    assert _cohort_rows(synth_site, 160) == before


def test_database_error_mid_build_leaves_previous_cohort(synth_site: Site, tmp_path: Path) -> None:
    """A DrugEra criterion needs drug_era, hidden here from the synthetic CDM: the build fails part-way."""
    good = load_definition(COHORTS / "incident_t2dm.yaml")
    build_cohorts(synth_site.engine, synth_site.config, [(good, 170)], replace=True)
    before = _cohort_rows(synth_site, 170)
    with synth_site.engine.connect() as conn:
        (before_hash,) = conn.execute(sa.text(
            f"SELECT definition_hash FROM {qualified(synth_site.config.results_schema, 'cohort_definition')} "
            "WHERE cohort_definition_id = 170")).one()
    text = (COHORTS / "eunomia_celecoxib_new_users.yaml").read_text().replace(
        "{drug_exposure: celecoxib, first: true}", "{drug_era: celecoxib}").replace("1118084", "1503297")
    bad = load_definition(_write(tmp_path, "era.yaml", text))
    cdm = synth_site.config.cdm_schema
    with synth_site.engine.begin() as conn:
        conn.execute(sa.text(f"ALTER TABLE {qualified(cdm, 'drug_era')} RENAME TO drug_era_hidden"))
    try:
        with pytest.raises(DatabaseError, match=r"failed at statement \d+/\d+ .*nothing was changed"):
            build_cohorts(synth_site.engine, synth_site.config, [(good, 171), (bad, 170)], replace=True)
    finally:
        with synth_site.engine.begin() as conn:
            conn.execute(sa.text(f"ALTER TABLE {qualified(cdm, 'drug_era_hidden')} RENAME TO drug_era"))
    assert _cohort_rows(synth_site, 170) == before
    assert _cohort_rows(synth_site, 171) == []  # the whole batch rolled back, the good one too
    with synth_site.engine.connect() as conn:
        assert conn.execute(sa.text(
            f"SELECT definition_hash FROM {qualified(synth_site.config.results_schema, 'cohort_definition')} "
            "WHERE cohort_definition_id = 170")).scalar_one() == before_hash


def test_mask_count() -> None:
    assert mask_count(9, 10) == "<10" and mask_count(0, 10) == "<10" and mask_count(10, 10) == 10


# ----------------------------------------------------------------------------- CLI
def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = run_omopfl(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_build_list_show(synth_site: Site, tmp_path: Path, capsys) -> None:
    adapter = str(synth_site.config.source)
    code, out, err = _cli(capsys, "cohort", "build", str(COHORTS / "incident_t2dm.yaml"),
                          str(COHORTS / "heart_failure.yaml"), "--site", adapter, "--id", "301", "--json")
    assert code == 0, err
    built = json.loads(out)
    assert [b["cohort_id"] for b in built] == [301, 302]
    assert built[0]["person_count"] == synth_site.truth["target_persons"]
    code, out, _ = _cli(capsys, "cohort", "list", "--site", adapter, "--json")
    listed = {c["cohort_id"]: c for c in json.loads(out)}
    assert listed[301]["persons"] == synth_site.truth["target_persons"]
    code, out, _ = _cli(capsys, "cohort", "show", "301", "--site", adapter, "--json")
    assert json.loads(out)["summary"]["name"].startswith("Incident type 2 diabetes")
    # the same id again, without --replace: one line, non-zero exit
    code, out, err = _cli(capsys, "cohort", "build", str(COHORTS / "incident_t2dm.yaml"), "--site", adapter,
                          "--id", "301")
    assert code == 5 and err.count("\n") == 1 and "already exists" in err


def _adapter_text(config: SiteConfig, min_cell_count: int) -> str:
    database = (f'duckdb_path = "{config.duckdb_path}"' if config.duckdb_path else f'url_env = "{config.url_env}"')
    return (f'[site]\nname = "{config.name}"\nmin_cell_count = {min_cell_count}\n[database]\n{database}\n'
            f'cdm_schema = "{config.cdm_schema}"\nresults_schema = "{config.results_schema}"\n')


def test_cli_masks_small_counts(synth_site: Site, tmp_path: Path, capsys) -> None:
    strict = _write(tmp_path, "strict.toml", _adapter_text(synth_site.config, 100000))
    assert load_site(strict).database_url() == synth_site.config.database_url()
    build_cohorts(synth_site.engine, synth_site.config, [(load_definition(COHORTS / "incident_t2dm.yaml"), 401)],
                  replace=True)
    code, out, _ = _cli(capsys, "cohort", "list", "--site", str(strict), "--json")
    assert code == 0
    listed = {c["cohort_id"]: c for c in json.loads(out)}
    assert listed[401]["persons"] == "<100000" and listed[401]["records"] == "<100000"
    code, out, _ = _cli(capsys, "cohort", "show", "401", "--site", str(strict), "--json")
    assert json.loads(out)["final_count"] == "<100000"


def test_cli_malformed_definition_is_one_line(tmp_path: Path, synth_site: Site, capsys) -> None:
    bad = _write(tmp_path, "bad.json", "{nope")
    code, _, err = _cli(capsys, "cohort", "build", str(bad), "--site", str(synth_site.config.source), "--id", "9")
    assert code == 5
    assert err.count("\n") == 1 and "not valid JSON" in err


# ----------------------------------------------------------------------------- read-only CDM (PostgreSQL)
def test_build_with_a_read_only_cdm_role(synth_site: Site) -> None:
    """SELECT on CDM and vocabulary, write access to the results schema only: enough to build."""
    if synth_site.backend != "postgresql":
        pytest.skip("database roles are a PostgreSQL feature")
    role = f"reader_{uuid.uuid4().hex[:8]}"
    cdm, results = synth_site.config.cdm_schema, f"ro_results_{uuid.uuid4().hex[:6]}"
    with synth_site.engine.begin() as conn:
        conn.execute(sa.text(f'CREATE ROLE "{role}" LOGIN'))
        conn.execute(sa.text(f'GRANT USAGE ON SCHEMA "{cdm}" TO "{role}"'))
        conn.execute(sa.text(f'GRANT SELECT ON ALL TABLES IN SCHEMA "{cdm}" TO "{role}"'))
        conn.execute(sa.text(f'CREATE SCHEMA "{results}" AUTHORIZATION "{role}"'))
    url = sa.engine.make_url(synth_site.config.database_url()).set(username=role, password=None)
    engine = make_engine(url.render_as_string(hide_password=False))
    config = SiteConfig(**{**synth_site.config.__dict__, "results_schema": results})
    try:
        (result,) = build_cohorts(engine, config, [(load_definition(COHORTS / "incident_t2dm.yaml"), 101)])
        assert result.person_count == synth_site.truth["target_persons"]
        with engine.connect() as conn, pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
            conn.execute(sa.text(f'DELETE FROM "{cdm}"."person"'))
    finally:
        engine.dispose()
