"""Training faults and bookkeeping, in process with real Flower strategies and messages.

* evaluation riding on the ``train`` message gives exactly the metrics of separate ``evaluate``
  messages (it is the same model on the same test rows);
* a run stopped after round 2 and resumed from its checkpoint ends with the same model and metrics
  as an uninterrupted run (FedAdam: the server's optimizer state is checkpointed too);
* a site that stops answering is dropped after the round timeout and the run finishes with the
  others; with fewer than ``min-sites`` left the run stops, keeps its last checkpoint and resumes.

The loss of a site is a grid whose messages to that node are never answered, as when a SuperNode
dies (the deployment test in tests/test_deployment.py kills a real one).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from omopfl.errors import FederationError
from omopfl.federation.flower_internals import InProcessGrid
from omopfl.federation.local import run_training, train_inprocess


@pytest.fixture(scope="module")
def federation(prepared_sites_factory) -> dict[str, Any]:
    return prepared_sites_factory("faults")


def _model(run_dir: Path) -> dict[str, np.ndarray]:
    with np.load(run_dir / "model.npz") as saved:
        return {k: saved[k] for k in saved.files}


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    return json.loads((run_dir / "metrics.json").read_text())["rounds"]


def _same_metrics(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    """Equal up to float32 rounding (the order sites are summed in may differ)."""
    assert [r["round"] for r in a] == [r["round"] for r in b]
    for x, y in zip(a, b, strict=True):
        for key in ("train_loss", "eval_loss", "eval_auc", "eval_accuracy", "eval_f1", "eval_kappa", "eval_n"):
            if key != "train_loss" and x[key] is None:  # withheld by the release rule: in both runs
                assert y[key] is None, (key, x, y)
                continue
            assert x[key] is not None and x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-9), (key, x, y)


def test_evaluation_on_the_train_message_equals_separate_evaluation(federation) -> None:
    runs = {}
    for riding in (True, False):
        run_dir = federation["tmp"] / f"eval_on_train_{riding}"
        manifest = run_training(federation["study"], federation["adapters"], federation["prepared_dir"],
                                out_dir=run_dir, rounds=3, evaluate_on_train=riding)
        runs[riding] = (manifest, _rows(run_dir), _model(run_dir))
    _same_metrics(runs[True][1], runs[False][1])
    for name, array in runs[True][2].items():
        np.testing.assert_allclose(array, runs[False][2][name], rtol=1e-5, atol=1e-7)
    # one exchange per round plus a final evaluation, instead of two per round (model weights equal up to
    # float32 rounding: the aggregation sums the sites in the order their replies arrive)
    sent = {riding: runs[riding][0]["bytes"]["sent"] for riding in runs}
    assert sent[True] < 0.8 * sent[False], sent  # the model goes out R + 1 times instead of 2R


def test_resume_continues_exactly_where_the_run_stopped(federation) -> None:
    whole = federation["tmp"] / "adam_whole"
    run_training(federation["study"], federation["adapters"], federation["prepared_dir"], out_dir=whole, rounds=4,
                 strategy="fedadam")
    parts = federation["tmp"] / "adam_parts"
    first = run_training(federation["study"], federation["adapters"], federation["prepared_dir"], out_dir=parts,
                         rounds=2, strategy="fedadam")
    assert first["resumed_from_round"] is None
    checkpoint = json.loads((parts / "checkpoint.json").read_text())
    assert checkpoint["round"] == 2 and set(checkpoint["strategy_state"]) == {"m_t", "v_t"}
    resumed = run_training(federation["study"], federation["adapters"], federation["prepared_dir"], out_dir=parts,
                           rounds=4, strategy="fedadam", resume=True)
    assert resumed["resumed_from_round"] == 2
    _same_metrics(_rows(parts), _rows(whole))
    for name, array in _model(whole).items():
        np.testing.assert_allclose(_model(parts)[name], array, rtol=1e-6, atol=1e-7)


def test_resume_refuses_other_settings_or_a_finished_run(federation) -> None:
    run_dir = federation["tmp"] / "resume_checks"
    run_training(federation["study"], federation["adapters"], federation["prepared_dir"], out_dir=run_dir, rounds=1)
    with pytest.raises(FederationError, match="settings differ"):
        run_training(federation["study"], federation["adapters"], federation["prepared_dir"], out_dir=run_dir,
                     rounds=2, strategy="fedprox", proximal_mu=0.5, resume=True)
    with pytest.raises(FederationError, match="already has round 1 of 1"):
        run_training(federation["study"], federation["adapters"], federation["prepared_dir"], out_dir=run_dir,
                     rounds=1, resume=True)
    from omopfl.errors import ConfigError

    with pytest.raises(ConfigError, match=r"checkpoint\.json not found"):
        run_training(federation["study"], federation["adapters"], federation["prepared_dir"],
                     out_dir=federation["tmp"] / "never_ran", rounds=1, resume=True)


def _silent_grid(site_index: int, from_round: int):
    """An InProcessGrid on which the ``site_index``-th node stops answering at train round ``from_round``."""

    class SilentAfter(InProcessGrid):
        def push_messages(self, messages):
            ids, live = [], []
            node = sorted(self.get_node_ids())[site_index]
            for message in messages:
                config = message.content.config_records.get("config", {})
                dead = (message.metadata.dst_node_id == node and message.metadata.message_type in ("train", "evaluate")
                        and int(config.get("server-round", 0)) >= from_round)
                if dead:  # accepted by the link, never answered: the node is gone
                    ids.append(self.lose(message))
                else:
                    live.append(message)
            return ids + list(super().push_messages(live))

    return SilentAfter


def _config(federation, run_dir: Path, **overrides: Any) -> dict[str, Any]:
    from omopfl.federation.run_config import training_run_config
    from omopfl.study import load_study

    values = {"min_sites": 2, "expected_sites": 3, "rounds": 3, "round_timeout": 1.0, **overrides}
    return training_run_config(load_study(federation["study"]), run_dir, **values)


def test_a_silent_site_is_dropped_and_the_run_finishes(federation) -> None:
    run_dir = federation["tmp"] / "silent_site"
    adapters = [Path(a).resolve() for a in federation["adapters"]]
    train_inprocess(adapters, federation["prepared_dir"].resolve(), _config(federation, run_dir),
                   grid_class=_silent_grid(2, from_round=2))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [d["site"] for d in manifest["dropped"]] == ["site_c"]
    assert manifest["dropped"][0]["round"] == 2 and "no train reply within 1 s" in manifest["dropped"][0]["reason"]
    assert manifest["sites"] == ["site_a", "site_b"]
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3] and [r["sites"] for r in rows] == [3, 2, 2]
    assert rows[-1]["eval_auc"] is not None and rows[-1]["train_n"] < rows[0]["train_n"]


def test_too_few_sites_stop_the_run_which_resumes_from_its_checkpoint(federation) -> None:
    run_dir = federation["tmp"] / "too_few"
    adapters = [Path(a).resolve() for a in federation["adapters"]]
    prepared = federation["prepared_dir"].resolve()
    with pytest.raises(FederationError, match="round 2: 2 site\\(s\\) replied, fewer than min-sites 3"):
        train_inprocess(adapters, prepared, _config(federation, run_dir, min_sites=3),
                       grid_class=_silent_grid(0, from_round=2))
    assert not (run_dir / "manifest.json").exists()
    assert json.loads((run_dir / "checkpoint.json").read_text())["round"] == 1
    train_inprocess(adapters, prepared, _config(federation, run_dir, min_sites=3, resume=True))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["resumed_from_round"] == 1 and manifest["dropped"] == []
    assert [r["round"] for r in _rows(run_dir)] == [1, 2, 3]


def test_a_site_below_its_min_cell_count_sends_nothing_learnt_from_its_rows(federation) -> None:
    """site_c with a min_cell_count above its cohort: its statistics are withheld, its train replies
    carry the weights back unchanged with num-examples 0 and its evaluations only num-examples 0, so
    the model is exactly the one the two other sites train alone."""
    strict = federation["tmp"] / "synth" / "adapters" / "site_c_strict.toml"
    text = (federation["tmp"] / "synth" / "adapters" / "site_c.toml").read_text()
    strict.write_text(text.replace("min_cell_count = ", "min_cell_count = 100000  # was ", 1))
    assert "min_cell_count = 100000" in strict.read_text()
    adapters = [federation["adapters"][0], federation["adapters"][1], strict]
    run_dir = federation["tmp"] / "strict_c"
    manifest = run_training(federation["study"], adapters, federation["prepared_dir"], out_dir=run_dir, rounds=2,
                            audit=True, min_sites=2)  # site_c replies but cannot train: it does not count
    assert manifest["stats_sites"]["withheld"] == ["site_c"]
    two = federation["tmp"] / "two_sites"
    run_training(federation["study"], federation["adapters"][:2], federation["prepared_dir"], out_dir=two, rounds=2)
    for name, array in _model(two).items():
        np.testing.assert_allclose(_model(run_dir)[name], array, rtol=1e-6, atol=1e-7)
    nodes = {entry["node"] for entry in json.loads((run_dir / "audit.json").read_text())["replies"]
             if entry["message_type"] == "query.stats" and entry["content"]["omopfl.site"]["site"] == "site_c"}
    replies = [r for r in json.loads((run_dir / "audit.json").read_text())["replies"]
               if r["node"] in nodes and r["message_type"] in ("train", "evaluate")]
    assert len(replies) == 3  # two train rounds, one final evaluation
    for reply in replies:
        for record, values in reply["content"].items():
            if record != "arrays":
                assert values == {"num-examples": 0}, (record, values)


def test_sites_that_did_not_train_do_not_count_toward_min_sites(federation) -> None:
    """A site below its min_cell_count answers every round with zero weight: it replied but did not
    train, so with min-sites 3 the run stops and says how many sites trained."""
    strict = federation["tmp"] / "synth" / "adapters" / "site_c_strict3.toml"
    text = (federation["tmp"] / "synth" / "adapters" / "site_c.toml").read_text()
    strict.write_text(text.replace("min_cell_count = ", "min_cell_count = 100000  # was ", 1))
    adapters = [Path(a).resolve() for a in (*federation["adapters"][:2], strict)]
    run_dir = federation["tmp"] / "zero_weight_min_sites"
    with pytest.raises(FederationError, match=r"round 1: 2 site\(s\) trained \(3 replied.*fewer than min-sites 3"):
        train_inprocess(adapters, federation["prepared_dir"].resolve(), _config(federation, run_dir, min_sites=3))
    assert not (run_dir / "manifest.json").exists()


def test_a_site_lost_in_the_statistics_phase_is_in_the_manifest_and_report(prepared_sites_factory) -> None:
    """site_b has not approved the study: it refuses the statistics query, trains in no round, and the
    manifest's ``dropped`` and the report's faults name it with the phase and the reason."""
    from omopfl import policy
    from omopfl.config import load_site

    fed = prepared_sites_factory("stats_fault")
    policy.revoke(load_site(fed["adapters"][1]), fed["study_hash"])
    run_dir = fed["tmp"] / "run"
    train_inprocess([Path(a).resolve() for a in fed["adapters"]], fed["prepared_dir"].resolve(),
                   _config(fed, run_dir, rounds=1))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["sites"] == ["site_a", "site_c"]
    assert manifest["dropped"] == [{"site": "site_b", "round": 0, "phase": "statistics",
                                    "reason": manifest["dropped"][0]["reason"]}]
    assert "(study_not_approved)" in manifest["dropped"][0]["reason"]
    from omopfl.report import write_report

    report = write_report(run_dir).read_text()
    assert "site site_b left in the statistics phase" in report and "study_not_approved" in report


def test_features_a_site_withholds_are_named_in_the_result_manifest_and_report(prepared_sites_factory) -> None:
    """site_c's own rule (k = 12) withholds some of its features but not its whole aggregate: the
    statistics result, the manifest and the report name them, and each named feature really has a
    small cell at site_c (checked on its prepared rows)."""
    import re

    from omopfl.prepare import load_prepared
    from omopfl.release import small
    from omopfl.report import write_report

    fed = prepared_sites_factory("suppressed")
    k = 12
    adapter = fed["adapters"][2]
    adapter.write_text(re.sub(r"min_cell_count = \d+", f"min_cell_count = {k}", adapter.read_text()))
    run_dir = fed["tmp"] / "run"
    manifest = run_training(fed["study"], fed["adapters"], fed["prepared_dir"], out_dir=run_dir, rounds=1)
    suppressed = manifest["stats_sites"]["suppressed"]
    assert set(suppressed) == {"site_c"} and suppressed["site_c"], suppressed
    assert json.loads((run_dir / "stats.json").read_text())["sites"]["suppressed"] == suppressed
    site_c = load_prepared(fed["prepared_dir"] / "site_c")
    x = np.asarray(site_c.x, dtype=float)
    for name in suppressed["site_c"]:
        column = x[:, site_c.feature_names.index(name)]
        present = column[~np.isnan(column)]
        cells = [present.size, column.size - present.size, int((present > 0).sum()), int((present == 0).sum())]
        assert any(small(c, k) for c in cells) or name.startswith("sex_"), (name, cells)
    report = write_report(run_dir).read_text()
    assert "Features withheld by a site's release rule" in report
    assert f"| site_c | {', '.join(suppressed['site_c'])} |" in report
