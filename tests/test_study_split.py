"""A test set fixed by the study (issue 14): ``[split]`` by a test cohort or by a per-person hash.

* the hash split is a function of (seed, person_id) only: the same persons whatever the row order,
  and adding persons never moves anyone already there;
* ``[split]`` is parsed strictly (one-line errors naming the key);
* a study with a test cohort, trained over three real sites in process: at every site the test rows
  the site evaluated on and trained without are exactly the target persons in that cohort, counted in
  SQL at the site, and the coordinator's config cannot move them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from omopfl.errors import ConfigError
from omopfl.splits import hash_test_mask, hash_unit, rows_from_mask
from omopfl.study import load_study

TEST_COHORT_ID = 9001


def test_hash_split_is_per_person_and_stable() -> None:
    rng = np.random.default_rng(0)
    ids = rng.choice(10**9, size=4000, replace=False)
    mask = hash_test_mask(ids.tolist(), 0.3, seed=7)
    assert 0.27 < mask.mean() < 0.33
    order = rng.permutation(ids.size)  # another row order: each person keeps its side
    np.testing.assert_array_equal(hash_test_mask(ids[order].tolist(), 0.3, seed=7), mask[order])
    more = np.concatenate([ids, rng.choice(np.arange(10**9, 2 * 10**9), size=500, replace=False)])
    np.testing.assert_array_equal(hash_test_mask(more.tolist(), 0.3, seed=7)[: ids.size], mask)
    other_seed = hash_test_mask(ids.tolist(), 0.3, seed=8)
    assert 0.5 < (other_seed == mask).mean() < 0.75  # another seed is another (independent) draw
    # a smaller fraction's test set lies inside a larger one's (the same hash, a lower cut)
    assert not (hash_test_mask(ids.tolist(), 0.1, seed=7) & ~mask).any()
    assert hash_unit(7, int(ids[0])) == hash_unit(7, int(ids[0])) and 0 <= hash_unit(0, 1) < 1
    train, test = rows_from_mask(mask)
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(ids.size)) and test.size == mask.sum()


def _study(tmp_path: Path, split: str, training_extra: str = "") -> Path:
    path = tmp_path / "study.toml"
    path.write_text(f'[study]\nname = "s"\n[cohorts]\ntarget = {{cohort_id = 1}}\noutcome = {{cohort_id = 2}}\n'
                    f"[training]\nrounds = 1\n{training_extra}{split}")
    return path


def test_split_section_parses(tmp_path: Path) -> None:
    assert load_study(_study(tmp_path, "")).split.method == "random"
    spec = load_study(_study(tmp_path, '[split]\nmethod = "hash"\ntest_fraction = 0.2\nseed = 5\n'))
    assert (spec.split.method, spec.split.test_fraction, spec.split.seed) == ("hash", 0.2, 5)
    assert spec.cohort_roles() == ("target", "outcome")
    spec = load_study(_study(tmp_path, "[split]\ntest_cohort = {cohort_id = 9}\n"))
    assert spec.split.method == "cohort" and spec.cohort_ids["test"] == 9 and spec.cohort_file("test") is None
    assert spec.cohort_roles() == ("target", "outcome", "test")
    definition = tmp_path / "test.json"
    definition.write_text("{}")
    spec = load_study(_study(tmp_path, '[split]\ntest_cohort = {file = "test.json", id = 12}\n'))
    assert spec.cohort_file("test") == definition.resolve() and spec.cohort_ids["test"] == 12


@pytest.mark.parametrize(("split", "extra", "message"), [
    ('[split]\nmethod = "halves"\n', "", r"\[split\] method must be one of random, hash, cohort"),
    ('[split]\nmethod = "hash"\ntest_fraction = 0\n', "", r"\[split\] test_fraction must be a finite number"),
    ('[split]\nmethod = "hash"\n', "test_fraction = 0.3\n", r"\[training\] test_fraction conflicts with"),
    ('[split]\nmethod = "cohort"\n', "", r"\[split\] test_cohort is missing"),
    ("[split]\ntest_cohort = {cohort_id = 1}\n", "", r"\[split\] test_cohort has the target or outcome"),
    ('[split]\ntest_cohort = "absent.json"\n', "", r"\[split\] test_cohort names a cohort definition file"),
    ('[split]\nmethod = "random"\nseed = 3\n', "", r"\[split\] seed does not apply"),
    ("[split]\nfraction = 0.2\n", "", r"\[split\] fraction is not a known key"),
])
def test_split_section_refuses_bad_input(tmp_path: Path, split: str, extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_study(_study(tmp_path, split, extra))


def _with_test_cohort(fed: dict) -> tuple[Path, dict[str, int]]:
    """Write a test cohort (id 9001) at each site: a third of the target persons plus one outside the
    target cohort; re-prepare and approve the study naming it.  Returns (study, SQL count per site)."""
    from omopfl import policy
    from omopfl.config import load_site
    from omopfl.db import make_engine, qualified
    from omopfl.prepare import load_prepared, prepare_site

    text = fed["study"].read_text().replace("test_fraction = 0.25\n", "")
    study = fed["tmp"] / "study_test_cohort.toml"
    study.write_text(text + f"\n[split]\ntest_cohort = {{cohort_id = {TEST_COHORT_ID}}}\n")
    spec = load_study(study)
    counts = {}
    for adapter in fed["adapters"]:
        site = load_site(adapter)
        target_id = int(load_prepared(fed["prepared_dir"] / site.name).manifest["cohorts"]["target"]["id"])
        cohort = qualified(site.results_schema, "cohort")
        engine = make_engine(site.database_url())
        try:
            with engine.begin() as conn:
                conn.execute(sa.text(
                    f"INSERT INTO {cohort} (cohort_definition_id, subject_id, cohort_start_date, cohort_end_date) "
                    f"SELECT :test, subject_id, cohort_start_date, cohort_end_date FROM {cohort} "
                    "WHERE cohort_definition_id = :target AND subject_id % 3 = 0"),
                    {"test": TEST_COHORT_ID, "target": target_id})
                outsider = conn.execute(sa.text(
                    f"SELECT min(person_id) FROM {qualified(site.cdm_schema, 'person')} WHERE person_id NOT IN "
                    f"(SELECT subject_id FROM {cohort} WHERE cohort_definition_id = :target)"),
                    {"target": target_id}).scalar_one()
                conn.execute(sa.text(f"INSERT INTO {cohort} VALUES (:test, :p, DATE '2020-01-01', DATE '2020-01-02')"),
                             {"test": TEST_COHORT_ID, "p": int(outsider)})
                counts[site.name] = int(conn.execute(sa.text(
                    f"SELECT count(DISTINCT t.subject_id) FROM {cohort} t "
                    f"JOIN {cohort} s ON s.subject_id = t.subject_id "
                    "WHERE t.cohort_definition_id = :target AND s.cohort_definition_id = :test"),
                    {"target": target_id, "test": TEST_COHORT_ID}).scalar_one())
            prepare_site(engine, site, spec, fed["prepared_dir"])
        finally:
            engine.dispose()
        policy.approve(site, spec)
    return study, counts


def test_a_test_cohort_is_every_site_s_evaluation(prepared_sites_factory) -> None:
    from omopfl import audit
    from omopfl.config import load_site
    from omopfl.federation.local import run_training
    from omopfl.federation.site.audit_trail import audit_path
    from omopfl.prepare import load_prepared

    fed = prepared_sites_factory("split_cohort", approve=False)
    study, counts = _with_test_cohort(fed)
    assert all(c > 10 for c in counts.values()), counts
    run_dir = fed["tmp"] / "run"
    run_training(study, fed["adapters"], fed["prepared_dir"], out_dir=run_dir, rounds=2, min_sites=2)
    released = 0
    for adapter in fed["adapters"]:
        site = load_site(adapter)
        prepared = load_prepared(fed["prepared_dir"] / site.name)
        assert prepared.test_mask is not None and int(prepared.test_mask.sum()) == counts[site.name]
        assert prepared.manifest["split"] == {"method": "cohort", "test_persons": counts[site.name]}
        persons = np.load(fed["prepared_dir"] / site.name / "persons.npy")
        assert not (persons[prepared.test_mask] % 3).any()  # the cohort's persons, not the outsider
        entries = [e for e in audit.read(audit_path(site)) if e["outcome"] == "sent"]
        evaluated = [r["values"]["num-examples"] for e in entries for r in e["records"]
                     if (e["message_type"], r["name"]) in {("evaluate", "metrics"), ("train", "evaluate")}]
        trained = [r["values"]["num-examples"] for e in entries if e["message_type"] == "train"
                   for r in e["records"] if r["name"] == "metrics"]
        assert evaluated and set(evaluated) <= {0, counts[site.name]}, (site.name, evaluated, counts)
        released += counts[site.name] in evaluated
        assert trained and set(trained) <= {0, prepared.n - counts[site.name]}, (site.name, trained)
    assert released >= 2  # the release rule (k = 2) let most sites' evaluations out


def test_a_cohort_split_study_without_its_mask_is_refused(prepared_sites_factory, tmp_path: Path) -> None:
    """A site whose prepared dataset lost its test mask refuses to train rather than fall back to a random split."""
    from omopfl import audit
    from omopfl.config import load_site
    from omopfl.errors import FederationError
    from omopfl.federation.local import run_training
    from omopfl.federation.site.audit_trail import audit_path

    fed = prepared_sites_factory("split_nomask", approve=False)
    study, _counts = _with_test_cohort(fed)
    for adapter in fed["adapters"]:
        (fed["prepared_dir"] / Path(adapter).stem / "test_mask.npy").unlink()
    with pytest.raises(FederationError, match="fewer than min-sites"):
        run_training(study, fed["adapters"], fed["prepared_dir"], out_dir=tmp_path / "run", rounds=1, min_sites=2)
    for adapter in fed["adapters"]:
        last = audit.read(audit_path(load_site(adapter)))[-1]
        assert (last["message_type"], last["outcome"], last["code"]) == ("train", "refused", "not_prepared")


def test_no_message_moves_the_fixed_test_set(prepared_sites_factory) -> None:
    """A coordinator asking for another split (the random one, another fraction) is refused by the site."""
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    from omopfl.federation import codec
    from omopfl.federation.flower_internals import InProcessGrid
    from omopfl.federation.site import app as site_app
    from omopfl.models import build_model

    fed = prepared_sites_factory("split_message", approve=False)
    study, _counts = _with_test_cohort(fed)
    spec = load_study(study)
    assert codec.training_settings(spec)["split-method"] == "cohort"
    node = {"site-config": str(fed["adapters"][0]), "prepared-dir": str(fed["prepared_dir"])}
    grid = InProcessGrid(site_app.app, [node], {})
    names = json_names(fed["prepared_dir"] / "site_a")
    arrays = ArrayRecord(build_model(spec.model, len(names)).state_dict())
    from omopfl.federation.flower_internals import superlink_task_identity

    with superlink_task_identity(grid.run.run_id):
        for override in ({"split-method": "random"}, {"test-fraction": 0.9}, {"split-method": "hash"}):
            config = ConfigRecord({codec.STUDY_HASH_KEY: spec.hash, "server-round": 1, **override})
            content = RecordDict({codec.TRAIN_CONFIG: config, codec.TRAIN_ARRAYS: arrays})
            reply = grid.send_and_receive([grid.create_message(content, "train", 1000, "g")])[0]
            assert codec.reply_refusal(reply.content) == ("site_a", "settings_mismatch"), override


def json_names(folder: Path) -> list[str]:
    import json

    return list(json.loads((folder / "manifest.json").read_text())["feature_names"])


def test_hash_split_is_prepared_per_person_and_survives_re_preparation(prepared_sites_factory) -> None:
    from omopfl.config import load_site
    from omopfl.db import make_engine
    from omopfl.prepare import load_prepared, prepare_site

    fed = prepared_sites_factory("split_hash", approve=False)
    text = fed["study"].read_text().replace("test_fraction = 0.25\n", "")
    study = fed["tmp"] / "study_hash.toml"
    study.write_text(text + '\n[split]\nmethod = "hash"\ntest_fraction = 0.3\nseed = 11\n')
    spec = load_study(study)
    site = load_site(fed["adapters"][1])
    engine = make_engine(site.database_url())
    try:
        prepare_site(engine, site, spec, fed["prepared_dir"])
        first = load_prepared(fed["prepared_dir"] / site.name)
        persons = np.load(fed["prepared_dir"] / site.name / "persons.npy")
        np.testing.assert_array_equal(first.test_mask, hash_test_mask(persons.tolist(), 0.3, 11))
        assert first.manifest["split"] == {"method": "hash", "test_persons": int(first.test_mask.sum())}
        prepare_site(engine, site, spec, fed["prepared_dir"])
    finally:
        engine.dispose()
    again = load_prepared(fed["prepared_dir"] / site.name)
    persons_again = np.load(fed["prepared_dir"] / site.name / "persons.npy")
    assert set(persons_again[again.test_mask].tolist()) == set(persons[first.test_mask].tolist())
