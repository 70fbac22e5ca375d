"""Disclosure control against a curious coordinator that speaks omopfl's protocol (omopfl.release).

The coordinator crafts weights (constant predictions, thresholds on one feature), asks with chosen
splits and seeds, many times.  The test computes the true confusion matrix of every model on the
site's own test rows (the approved study's split) and checks that no released number implies a cell
between 1 and k-1, in the replies and in the site's audit log.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import serve_at_site
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from omopfl import audit, release
from omopfl.config import load_site
from omopfl.federation import codec
from omopfl.federation.site import audit_trail
from omopfl.moments import Moments
from omopfl.suppression import binary_columns, suppress

K = 10
PROBE_K = 3


# --------------------------------------------------------------------------------------------
# statistics: each attack of the issue, before (stats.suppress alone) and after (release.moments)
# --------------------------------------------------------------------------------------------


def _released(x: np.ndarray, names: list[str], **kwargs: Any) -> dict[str, bool]:
    out = release.moments(x, names, x.shape[0], K, **kwargs)
    return dict(zip(names, out.released, strict=True))


def test_a_count_feature_with_few_exposed_persons_is_withheld() -> None:
    rng = np.random.default_rng(0)
    statins = np.zeros(200)
    statins[:4] = rng.integers(1, 6, 4)  # 4 persons exposed: sum and sum of squares bound that count
    x = np.column_stack([rng.normal(60, 10, 200), statins])
    names = ["age", "statin_prescriptions"]
    before = suppress(Moments.from_array(x, names, persons=200), K, binary=binary_columns(x))
    assert before.released == (True, True)  # the moments left the site before
    assert _released(x, names, counts=["statin_prescriptions"]) == {"age": True, "statin_prescriptions": False}
    statins[:12] = rng.integers(1, 6, 12)
    x = np.column_stack([x[:, 0], statins])
    assert _released(x, names, counts=["statin_prescriptions"])["statin_prescriptions"]


def test_levels_whose_complement_is_small_are_withheld_together() -> None:
    n = 100
    male = np.zeros(n)
    male[:50] = 1
    female = 1 - male
    female[-3:] = 0  # 3 persons of unknown sex: persons - ones(male) - ones(female) = 3
    x = np.column_stack([male, female, np.arange(n, dtype=float)])
    names = ["sex_male", "sex_female", "age"]
    before = suppress(Moments.from_array(x, names, persons=n), K, binary=binary_columns(x))
    assert before.released == (True, True, True)
    after = _released(x, names, groups={"sex": ["sex_male", "sex_female"]})
    assert after == {"sex_male": False, "sex_female": False, "age": True}
    female[-3:] = 1
    x[:, 1] = female
    assert _released(x, names, groups={"sex": ["sex_male", "sex_female"]})["sex_male"]


def test_training_counts_whose_complement_is_small_do_not_leave() -> None:
    assert release.may_train(100, 0, K) and release.may_train(100, 25, K)
    assert not release.may_train(100, 5, K)  # statistics' persons - num-examples = 5 test rows
    assert not release.may_train(9, 30, K)


def test_the_last_check_refuses_small_counts_in_a_reply() -> None:
    release.check_reply("train", {"metrics": {"num-examples": 40, "loss": 0.3}}, K)
    release.check_reply("train", {"metrics": {"num-examples": 0}}, K)
    for records in ({"metrics": {"num-examples": 5}},
                    {"evaluate": {"num-examples": 25, "auc": 0.7}},  # evaluations need 4k rows
                    {"evaluate": {"num-examples": 0, "auc": 0.7}},
                    {"omopfl.moments": {"persons": 50, "n": [45]}},
                    {"omopfl.moments": {"persons": 8, "n": [8]}}):
        with pytest.raises(release.ReleaseViolation):
            release.check_reply("train", records, K)


def test_evaluation_needs_every_confusion_cell() -> None:
    y = np.array([1] * 5 + [0] * 20)
    p = np.array([0.9] * 1 + [0.1] * 4 + [0.9] * 2 + [0.1] * 18)  # TP=1, FP=2, FN=4, TN=18 (the case)
    assert release.confusion(y, p) == (1, 2, 4, 18)
    assert release.evaluation(y, p, 0.5, K) is None
    y = np.array([1] * 30 + [0] * 30)
    p = np.array([0.9] * 20 + [0.1] * 10 + [0.9] * 12 + [0.1] * 18)
    metrics = release.evaluation(y, p, 0.5, K)
    assert metrics is not None and metrics["accuracy"] == round(38 / 60, release.METRIC_DECIMALS)


# --------------------------------------------------------------------------------------------
# a curious coordinator probing one site with crafted models
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def probed(prepared_sites_factory) -> dict[str, Any]:
    from omopfl.federation.local import run_stats

    federation = prepared_sites_factory("disclosure")
    # site_a's test split holds 9 outcomes: with k = 10 no evaluation can ever leave it; with k = 3 some can
    adapter = federation["adapters"][0]
    text = adapter.read_text()
    adapter.write_text(re.sub(r"min_cell_count = \d+", f"min_cell_count = {PROBE_K}", text))
    run_stats(federation["study"], federation["adapters"], federation["prepared_dir"], mode="inprocess",
              out=federation["tmp"] / "stats.json")  # each site keeps the global scaler (scaler.json)
    return federation


def _site_truth(federation: dict[str, Any]) -> tuple[Any, np.ndarray, np.ndarray]:
    """The site's tensors and its test rows, as the approved study splits them."""
    from omopfl.federation.site.statistics import load_site_dataset
    from omopfl.models import SiteTensors, split
    from omopfl.study import load_study

    node_config = {"site-config": str(federation["adapters"][0]), "prepared-dir": str(federation["prepared_dir"])}
    _site, prepared = load_site_dataset(node_config)
    scaler = codec.GlobalScaler.from_dict(json.loads((federation["prepared_dir"] / "site_a" / "scaler.json")
                                                     .read_text()))
    tensors = SiteTensors.from_prepared(prepared, scaler)
    t = load_study(federation["study"]).training
    _train, test = split(tensors.n, t.test_fraction, t.seed, prepared.y)
    return tensors, test, tensors.y.numpy()[test]


def _ask(federation: dict[str, Any], message_type: str, weight: np.ndarray, bias: float, run_id: int,
         **config: Any) -> RecordDict:
    content = RecordDict({
        "arrays": ArrayRecord({"linear.weight": _array(weight.reshape(1, -1)),
                               "linear.bias": _array(np.array([bias]))}),
        "config": ConfigRecord({"server-round": 1, "study-hash": federation["study_hash"], **config}),
    })
    context = Context(run_id=run_id, node_id=1, node_config={"site-config": str(federation["adapters"][0]),
                                                              "prepared-dir": str(federation["prepared_dir"])},
                      state=RecordDict(), run_config={})
    return serve_at_site(content, context, message_type, run_id=run_id, message_id=f"m{run_id}",
                          node_id=1).content


def _array(values: np.ndarray) -> Any:
    from flwr.app import Array

    return Array(values.astype(np.float32))


def _cells(tensors: Any, test: np.ndarray, y: np.ndarray, weight: np.ndarray, bias: float) -> tuple[int, ...]:
    x = tensors.x.numpy()[test].astype(np.float64)
    prob = 1 / (1 + np.exp(-(x @ weight + bias)))
    return release.confusion(y, prob)


@pytest.mark.slow
def test_crafted_models_never_release_a_small_confusion_cell(probed) -> None:
    tensors, test, y = _site_truth(probed)
    d = tensors.n_features
    probes: list[tuple[np.ndarray, float]] = [(np.zeros(d), 20.0), (np.zeros(d), -20.0)]  # everyone +/-
    x = tensors.x.numpy()[test].astype(np.float64)
    for j in range(min(d, 4)):  # thresholds on one feature, from "only the top few" to "all but a few"
        values = np.sort(x[:, j])
        for rank in (1, 3, 5, 9, len(values) // 2, len(values) - 4, len(values) - 1):
            weight = np.zeros(d)
            weight[j] = 60.0
            probes.append((weight, -60.0 * (values[min(rank, len(values) - 1)] - 1e-6)))
    released = withheld = 0
    sent: list[str] = []
    for run_id, (weight, bias) in enumerate(probes, start=100):  # a fresh run per probe: no per-run limit
        reply = _ask(probed, "evaluate", weight, bias, run_id)
        metrics = dict(reply.metric_records["metrics"])
        sent.append(reply.object_id)
        cells = _cells(tensors, test, y, weight, bias)
        if metrics.get("num-examples", 0) == 0:
            assert set(metrics) == {"num-examples"}
            withheld += 1
            continue
        released += 1
        assert min(cells) >= PROBE_K, cells  # no released number implies a small cell
        assert metrics["num-examples"] == sum(cells)
        tp, _fp, _fn, tn = cells
        assert metrics["accuracy"] == pytest.approx((tp + tn) / sum(cells), abs=1e-4)
    assert withheld >= 2 and released >= 1  # constant and few-person models withheld; others released
    entries = {e["sha256"]: e for e in audit.read(audit_trail.audit_path(load_site(probed["adapters"][0])))}
    for digest in sent:  # the audit log holds every reply, with the numbers that left
        entry = entries[digest]
        values = next(r for r in entry["records"] if r["name"] == "metrics")["values"]
        assert values["num-examples"] == 0 or values["num-examples"] >= 4 * PROBE_K


def test_chosen_splits_seeds_and_repeats_are_refused(probed) -> None:
    tensors, _test, _y = _site_truth(probed)
    weight = np.zeros(tensors.n_features)
    for config in ({"test-fraction": 0.9}, {"seed": 123}, {"local-epochs": 100}, {"model-kind": "mlp"}):
        reply = _ask(probed, "evaluate", weight, 0.0, 7, **config)
        assert codec.reply_refusal(reply) == ("site_a", "settings_mismatch"), config
    # the approved study has 5 rounds: a sixth evaluation in one run is refused
    codes = [codec.reply_refusal(_ask(probed, "evaluate", weight, 0.0, 8)) for _ in range(6)]
    assert codes[:5] == [None] * 5 and codes[5] == ("site_a", "round_limit")
    path: Path = audit_trail.audit_path(load_site(probed["adapters"][0]))
    last = audit.read(path)[-1]
    assert (last["outcome"], last["code"]) == ("refused", "round_limit")
