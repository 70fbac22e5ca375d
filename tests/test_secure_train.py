"""Secure aggregation of training updates (``[privacy] secure_aggregation = true``, issue 12).

Through omopfl's run_training on Flower's in-process grid, the secure run's final model equals the plain
FedAvg run's; a hostile coordinator that speaks the protocol to each site directly is refused when it
skips the key round, re-keys, lists too few or other participants, asks for a round twice or beyond the
study's rounds, or substitutes keys against pinned participants; what it receives from one site is not
that site's update, while the sum of the three is the sum of the true updates; a participant that drops
out stops the run with a one-line error.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import prepare_and_approve, serve_at_site
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from omopfl import policy, secagg
from omopfl.config import load_site
from omopfl.federation import codec
from omopfl.federation import codec_secure_rounds as secure_train
from omopfl.federation import codec_secure_statistics as secure_stats
from omopfl.federation.site import audit_trail
from omopfl.federation.site import secure as site_secure
from omopfl.study import load_study

SITES = ("site_a", "site_b", "site_c")


def _prepare(federation: dict[str, Any], name: str, extra: str) -> dict[str, Any]:

    study = federation["tmp"] / f"study_{name}.toml"
    study.write_text(federation["study"].read_text() + extra)
    spec = load_study(study)
    prepared = federation["tmp"] / f"prepared_{name}"
    prepare_and_approve(federation["adapters"], spec, prepared)
    return {"study": study, "prepared": prepared, "hash": spec.hash, "spec": spec}


@pytest.fixture(scope="module")
def secure(prepared_sites_factory) -> dict[str, Any]:
    federation = prepared_sites_factory("secagg_train")
    return {**federation, **{f"secure_{k}": v for k, v in
                             _prepare(federation, "secure", "\n[privacy]\nsecure_aggregation = true\n").items()}}


def _model(run_dir: Path) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO((run_dir / "model.npz").read_bytes())) as saved:
        return {k: saved[k] for k in saved.files}


def _serve(secure: dict[str, Any], index: int, content: RecordDict, run_id: int, message_type: str,
           prepared: Path | None = None) -> RecordDict:
    """What a coordinator receives from site ``index`` for one message (the site's own trust boundary)."""
    context = Context(run_id=run_id, node_id=index + 1,
                      node_config={"site-config": str(secure["adapters"][index]),
                                   "prepared-dir": str(prepared or secure["secure_prepared"])},
                      state=RecordDict(), run_config={})
    return serve_at_site(content, context, message_type, run_id=run_id, message_id=f"m{run_id}-{index}",
                          node_id=index + 1).content


def _code(reply: RecordDict) -> str:
    refusal = codec.reply_refusal(reply)
    return refusal[1] if refusal is not None else ""


def _keys(secure: dict[str, Any], run_id: int, h: str, prepared: Path | None = None) -> secure_train.Participants:
    replies = [secure_stats.decode_reply(_serve(secure, i, secure_train.encode_keys_request(h), run_id,
                                                secure_stats.SECAGG_QUERY, prepared)) for i in range(3)]
    assert all(not isinstance(r, codec.SiteReply) for r in replies)
    return secure_train.Participants(tuple(r[0] for r in replies), tuple(r[1]["public-key"] for r in replies),
                                     tuple(r[1]["signature"] for r in replies))


def _train(h: str, server_round: int, arrays: ArrayRecord,
           participants: secure_train.Participants | None) -> RecordDict:
    config = ConfigRecord({codec.STUDY_HASH_KEY: h, "server-round": server_round})
    records: dict[str, Any] = {codec.TRAIN_CONFIG: config, codec.TRAIN_ARRAYS: arrays}
    if participants is not None:
        records[secure_train.TRAIN_RECORD] = secure_train.encode_train_request(participants)
    return RecordDict(records)


def _masked(reply: RecordDict) -> secagg.MaskedVector:
    decoded = secure_stats.decode_reply(RecordDict({"omopfl.secagg": reply.config_records["omopfl.secagg"]}))
    assert not isinstance(decoded, codec.SiteReply)
    r = decoded[1]
    return secagg.MaskedVector.from_dict({"site": decoded[0], "run_id": r["run-id"], "round_id": r["round-id"],
                                          "label": r["label"], "sites_digest": r["sites-digest"],
                                          "n_sites": r["n-sites"], "frac_bits": r["frac-bits"], "data": r["data"]})


@pytest.fixture(scope="module")
def runs(secure) -> dict[str, Any]:
    """The plain FedAvg run and the secure run of the same sites, 2 rounds each."""
    from omopfl.federation.local import run_training

    plain = run_training(secure["study"], secure["adapters"], secure["prepared_dir"], mode="inprocess",
                         out_dir=secure["tmp"] / "run_plain", rounds=2, audit=True)
    masked = run_training(secure["secure_study"], secure["adapters"], secure["secure_prepared"], mode="inprocess",
                          out_dir=secure["tmp"] / "run_secure", rounds=2, audit=True)
    return {"plain": plain, "secure": masked, "plain_dir": secure["tmp"] / "run_plain",
            "secure_dir": secure["tmp"] / "run_secure"}


def test_the_secure_run_gives_the_plain_fedavg_model(secure, runs) -> None:
    assert runs["secure"]["secure_aggregation"] == {"statistics": True, "training": True, "participants": list(SITES)}
    assert "secure_aggregation" not in runs["plain"]
    a, b = _model(runs["plain_dir"]), _model(runs["secure_dir"])
    assert list(a) == list(b)
    worst = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)
    print("secure vs plain FedAvg, max abs difference of the final model:", worst)
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-6)
    plain_rows = json.loads((runs["plain_dir"] / "metrics.json").read_text())["rounds"]
    secure_rows = json.loads((runs["secure_dir"] / "metrics.json").read_text())["rounds"]
    for p, s in zip(plain_rows, secure_rows, strict=True):
        assert s["sites"] == p["sites"] == 3 and s["train_n"] == p["train_n"]
        assert s["train_loss"] == pytest.approx(p["train_loss"], abs=1e-6)
    # the coordinator's record of what it received: no site's arrays nor train rows, only masked bytes
    replies = json.loads((runs["secure_dir"] / "audit.json").read_text())["replies"]
    train = [r for r in replies if r["message_type"] == "train"]
    assert len(train) == 6
    for reply in train:
        records = reply["content"]
        assert codec.TRAIN_ARRAYS not in records and codec.TRAIN_METRICS not in records
        assert "omopfl.secagg" in records
    # each site's audit log lists its masked releases, one per round
    for adapter in secure["adapters"]:
        from omopfl import audit

        entries = [e for e in audit.read(audit_trail.audit_path(load_site(adapter)))
                   if e["study_hash"] == secure["secure_hash"] and e["message_type"] == "train"
                   and e["outcome"] == "sent"]
        assert [e["server_round"] for e in entries][-2:] == [1, 2]
        for entry in entries[-2:]:
            (record,) = [r for r in entry["records"] if r["name"] == "omopfl.secagg"]
            assert record["values"]["label"] == secure_train.LABEL
            assert record["values"]["round-id"] == f"train-{entry['server_round']}"
            assert not any(r["kind"] == "array" for r in entry["records"])


def test_a_hostile_coordinator_is_refused(secure, runs) -> None:
    h = secure["secure_hash"]
    arrays = ArrayRecord({k: Array(v) for k, v in _model(runs["secure_dir"]).items()})
    train = "train"
    # no key round in this run
    fake = secure_train.Participants(SITES, ("00" * 32,) * 3, ("",) * 3)
    assert _code(_serve(secure, 0, _train(h, 1, arrays, fake), 7001, train)) == "secagg_refused"
    # a train message without the participant list
    assert _code(_serve(secure, 0, _train(h, 1, arrays, None), 7001, train)) == "bad_request"
    run_id = 7002
    participants = _keys(secure, run_id, h)
    assert participants.sites == SITES
    # re-keying in the same run
    reply = _serve(secure, 1, secure_train.encode_keys_request(h), run_id, secure_stats.SECAGG_QUERY)
    assert _code(reply) == "secagg_refused"
    # a participant list of this site alone, or of two
    alone = secure_train.Participants(SITES[:1], participants.keys[:1], participants.signatures[:1])
    assert _code(_serve(secure, 0, _train(h, 1, arrays, alone), run_id, train)) == "secagg_refused"
    two = secure_train.Participants(SITES[:2], participants.keys[:2], participants.signatures[:2])
    assert _code(_serve(secure, 0, _train(h, 1, arrays, two), run_id, train)) == "secagg_refused"
    # the site's own key replaced
    swapped = secure_train.Participants(SITES, (participants.keys[1], participants.keys[0], participants.keys[2]),
                                        participants.signatures)
    assert _code(_serve(secure, 0, _train(h, 1, arrays, swapped), run_id, train)) == "secagg_refused"
    # the honest round 1
    first = _serve(secure, 0, _train(h, 1, arrays, participants), run_id, train)
    assert _code(first) == "" and _masked(first).round_id == "train-1"
    # the same round again (e.g. with a site claimed dropped): refused
    assert _code(_serve(secure, 0, _train(h, 1, arrays, participants), run_id, train)) == "secagg_refused"
    # round 2 with another participant list (site_c's key replaced by the coordinator's)
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    own = X25519PrivateKey.generate().public_key().public_bytes(serialization.Encoding.Raw,
                                                                serialization.PublicFormat.Raw).hex()
    other = secure_train.Participants(SITES, (*participants.keys[:2], own), participants.signatures)
    assert _code(_serve(secure, 0, _train(h, 2, arrays, other), run_id, train)) == "secagg_refused"
    # beyond the study's rounds
    rounds = int(secure["secure_spec"].training.rounds)
    assert _code(_serve(secure, 0, _train(h, rounds + 1, arrays, participants), run_id, train)) == "round_limit"
    # a study without secure aggregation: the participant record is refused
    plain = _serve(secure, 0, _train(secure["study_hash"], 1, arrays, participants), 7003, train,
                   prepared=secure["prepared_dir"])
    assert _code(plain) == "settings_mismatch"


def test_pinned_participants_refuse_substituted_keys(secure, runs) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    keys = {name: site_secure.identity_public_key(load_site(a)) for name, a in zip(SITES, secure["adapters"],
                                                                                  strict=True)}
    pinned = _prepare(secure, "pinned_train", "\n[privacy]\nsecure_aggregation = true\n\n[privacy.participants]\n"
                      + "".join(f'{n} = "{k}"\n' for n, k in keys.items()))
    h, run_id = pinned["hash"], 7101
    for name in SITES:  # the global scaler of the secure run, as a statistics phase of this study would leave it
        scaler = json.loads((secure["secure_prepared"] / name / "scaler.json").read_text())
        (pinned["prepared"] / name / "scaler.json").write_text(json.dumps({**scaler, "study_hash": h}))
    arrays = ArrayRecord({k: Array(v) for k, v in _model(runs["secure_dir"]).items()})
    participants = _keys(secure, run_id, h, pinned["prepared"])
    # site_b's key replaced by the coordinator's own, signed by the coordinator's identity key
    raw = X25519PrivateKey.generate().public_key().public_bytes(serialization.Encoding.Raw,
                                                                serialization.PublicFormat.Raw)
    forged = Ed25519PrivateKey.generate().sign(
        secagg.PublicKeyBundle("site_b", f"{h}:{run_id}:train", raw).signed_bytes()).hex()
    substituted = secure_train.Participants(SITES, (participants.keys[0], raw.hex(), participants.keys[2]),
                                            (participants.signatures[0], forged, participants.signatures[2]))
    reply = _serve(secure, 0, _train(h, 1, arrays, substituted), run_id, "train", pinned["prepared"])
    assert _code(reply) == "secagg_refused"
    # a name that is not pinned
    invented = secure_train.Participants(("site_a", "site_b", "site_x"), participants.keys, participants.signatures)
    reply = _serve(secure, 0, _train(h, 1, arrays, invented), run_id, "train", pinned["prepared"])
    assert _code(reply) == "secagg_refused"
    # the honest, pinned list works
    reply = _serve(secure, 0, _train(h, 1, arrays, participants), run_id, "train", pinned["prepared"])
    assert _code(reply) == ""


def test_what_the_coordinator_receives_is_not_the_sites_update(secure, runs) -> None:
    from omopfl.federation.site import training as site_train

    h = secure["secure_hash"]
    arrays = ArrayRecord({k: Array(v) for k, v in _model(runs["secure_dir"]).items()})
    run_id = 7201
    participants = _keys(secure, run_id, h)
    masked = [_masked(_serve(secure, i, _train(h, 1, arrays, participants), run_id, "train")) for i in range(3)]
    # the sites' true vectors, computed here by the sites' own training code on the same content
    approved = policy.approved_study(load_site(secure["adapters"][0]), h)
    assert approved is not None
    config = {k: v for k, v in approved.settings.items() if k != "rounds"}
    config.update({"server-round": 1, codec.STUDY_HASH_KEY: h, "evaluate-received": False})
    truths = []
    for i in range(3):
        context = Context(run_id=run_id, node_id=i + 1, state=RecordDict(), run_config={},
                          node_config={"site-config": str(secure["adapters"][i]),
                                       "prepared-dir": str(secure["secure_prepared"])})
        plain = site_train.site_train(RecordDict({codec.TRAIN_CONFIG: ConfigRecord(config),
                                                  codec.TRAIN_ARRAYS: arrays}), context)
        truths.append(secure_train.train_vector(plain, arrays)[0])
    for vector, truth in zip(masked, truths, strict=True):
        data = vector.data[:-1]
        plain_fixed = np.rint(truth * 2.0**vector.frac_bits).astype(np.int64).view(np.uint64)
        assert not np.any(data == plain_fixed)  # no value leaves in clear
        as_plain = data.view(np.int64).astype(np.float64) / 2.0**vector.frac_bits
        assert np.median(np.abs(as_plain - truth)) > 1e6  # read as plain: nonsense, far from the update
        u = data.astype(np.float64) / 2.0**64
        assert abs(u.mean() - 0.5) < 4.5 * np.sqrt(1 / 12 / u.size)
    total = secagg.unmask_sum(masked)
    np.testing.assert_allclose(total, np.sum(truths, axis=0), rtol=0, atol=3 * 2.0**-24)
    assert total[1] == sum(t[1] for t in truths) and total[0] == 3


def test_a_participant_that_drops_out_stops_the_run_with_one_line(secure, runs) -> None:
    from omopfl.federation.local import run_training

    # site_c's policy allows one round only: in round 2 it refuses (round_limit), so its masked update is missing
    limited = secure["tmp"] / "site_c_one_round.toml"
    state = policy.state_dir(load_site(secure["adapters"][2]))  # the same site (its approval), a stricter policy
    limited.write_text(secure["adapters"][2].read_text() + f'\n[policy]\nmax_rounds = 1\nstate_dir = "{state}"\n')
    adapters = [*secure["adapters"][:2], limited]
    with pytest.raises(Exception) as raised:
        run_training(secure["secure_study"], adapters, secure["secure_prepared"], mode="inprocess",
                     out_dir=secure["tmp"] / "run_dropout", rounds=2)
    text = str(raised.value)
    print(text)
    assert "secure aggregation lost: site_c" in text and "no dropout tolerance" in text
    checkpoint = json.loads((secure["tmp"] / "run_dropout" / "checkpoint.json").read_text())
    assert checkpoint["round"] == 1  # the last good round is kept


def test_fedadam_with_secure_aggregation_is_refused_at_parse_time(secure) -> None:
    from omopfl.errors import ConfigError

    study = secure["tmp"] / "study_fedadam.toml"
    study.write_text(secure["study"].read_text().replace('strategy = "fedavg"', 'strategy = "fedadam"')
                     + "\n[privacy]\nsecure_aggregation = true\n")
    with pytest.raises(ConfigError, match=r"\[training\] strategy fedadam cannot be combined"):
        load_study(study)


def test_fedprox_with_secure_aggregation_gives_the_plain_fedprox_model(secure) -> None:
    from omopfl.federation.local import run_training

    text = secure["study"].read_text().replace('strategy = "fedavg"', 'strategy = "fedprox"\nproximal_mu = 0.1')
    assert "fedprox" in text
    base = {"tmp": secure["tmp"], "study": secure["tmp"] / "study_fedprox_base.toml", "adapters": secure["adapters"]}
    base["study"].write_text(text)
    plain = _prepare(base, "fedprox_plain", "\n")
    masked = _prepare(base, "fedprox_secure", "\n[privacy]\nsecure_aggregation = true\n")
    runs = {}
    for name, prepared in (("plain", plain), ("secure", masked)):
        runs[name] = secure["tmp"] / f"run_fedprox_{name}"
        run_training(prepared["study"], secure["adapters"], prepared["prepared"], mode="inprocess",
                     out_dir=runs[name], rounds=2)
    assert json.loads((runs["secure"] / "manifest.json").read_text())["secure_aggregation"]["training"] is True
    a, b = _model(runs["plain"]), _model(runs["secure"])
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-6)
