"""Secure aggregation of the statistics phase (``[privacy] secure_aggregation = true``).

Through the real ServerApp/ClientApps (in-process Flower) the global moments equal the plain federated
result to float precision; a hostile coordinator that speaks the protocol to each site directly gets
masked vectors that look uniformly random and differ from the sites' true moments, while their sum is
the pooled result; it is refused when it lists too few participants, leaves a site's own key out,
asks a site to mask a round twice, or asks for plain ``query.stats`` of the study.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import prepare_and_approve, serve_at_site
from flwr.app import Context, RecordDict

from omopfl import policy, secagg
from omopfl.config import load_site
from omopfl.federation import codec
from omopfl.federation import codec_secure_statistics as secure_stats
from omopfl.federation.site import secure as site_secure
from omopfl.study import load_study

SITES = ("site_a", "site_b", "site_c")


@pytest.fixture(scope="module")
def secure(prepared_sites_factory) -> dict[str, Any]:

    federation = prepared_sites_factory("secagg")
    study = federation["tmp"] / "study_secagg.toml"
    study.write_text(federation["study"].read_text() + "\n[privacy]\nsecure_aggregation = true\n")
    spec = load_study(study)
    prepared = federation["tmp"] / "prepared_secagg"
    prepare_and_approve(federation["adapters"], spec, prepared)
    return {**federation, "secure_study": study, "secure_prepared": prepared, "secure_hash": spec.hash}


def _serve(secure: dict[str, Any], index: int, content: RecordDict, run_id: int,
           message_type: str = secure_stats.SECAGG_QUERY, prepared: Path | None = None) -> RecordDict:
    """What a coordinator receives from site ``index`` for one message (the site's own trust boundary)."""
    context = Context(run_id=run_id, node_id=index + 1,
                      node_config={"site-config": str(secure["adapters"][index]),
                                   "prepared-dir": str(prepared or secure["secure_prepared"])},
                      state=RecordDict(), run_config={})
    return serve_at_site(content, context, message_type, run_id=run_id, message_id=f"m{run_id}-{index}",
                          node_id=index + 1).content


def _code(reply: RecordDict) -> str:
    decoded = secure_stats.decode_reply(reply)
    return decoded.code if isinstance(decoded, codec.SiteReply) else ""


def test_secure_statistics_equal_the_plain_federated_result(secure) -> None:
    from omopfl.federation.local import run_stats

    plain = run_stats(secure["study"], secure["adapters"], secure["prepared_dir"], mode="inprocess",
                      out=secure["tmp"] / "plain.json")
    masked = run_stats(secure["secure_study"], secure["adapters"], secure["secure_prepared"], mode="inprocess",
                       out=secure["tmp"] / "secure.json")
    assert plain["sites"]["contributing"] == list(SITES)
    assert masked["secure_aggregation"] == {"participants": list(SITES), "contributed": 3, "rounds": 2}
    assert masked["sites"]["persons"] == {}  # no site's own count reaches the coordinator
    g, h = plain["global"], masked["global"]
    assert h["feature_names"] == g["feature_names"] and h["n"] == g["n"] and h["persons"] == g["persons"]
    def rel(a: list[Any], b: list[Any]) -> float:
        x, y = np.array(a, float), np.array(b, float)
        ok = np.isfinite(x) & np.isfinite(y) & (y != 0)
        return float(np.max(np.abs(x[ok] - y[ok]) / np.abs(y[ok])))

    print("secure vs plain, max relative error: mean", rel(h["mean"], g["mean"]), "std", rel(h["std"], g["std"]))
    np.testing.assert_allclose(np.array(h["mean"], float), np.array(g["mean"], float), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(np.array(h["std"], float), np.array(g["std"], float), rtol=1e-7, atol=1e-9)
    assert masked["scaler"] is not None and masked["sites"]["scaler_acknowledged"] == list(SITES)


def test_a_hostile_coordinator_sees_only_random_looking_vectors_whose_sum_is_the_pooled_result(secure) -> None:
    from omopfl.federation.site.statistics import site_statistics
    from omopfl.prepare import load_prepared

    run_id = 4242
    h = secure["secure_hash"]
    keys = [secure_stats.decode_reply(_serve(secure, i, secure_stats.encode_keys_request(h), run_id))
            for i in range(3)]
    names = [k[0] for k in keys]
    public = [k[1]["public-key"] for k in keys]
    assert names == list(SITES)
    feature_names = keys[0][1]["feature-names"]
    # a site refuses a second key set in the same run
    assert _code(_serve(secure, 0, secure_stats.encode_keys_request(h), run_id)) == "secagg_refused"
    # too few participants listed, a site left out, or its own key replaced: refused
    assert _code(_serve(secure, 0, secure_stats.encode_mask_request(h, 1, names[:2], public[:2]), run_id)) \
        == "secagg_refused"
    assert _code(_serve(secure, 2, secure_stats.encode_mask_request(h, 1, names[:2], public[:2]), run_id)) \
        == "secagg_refused"
    # round 2 before round 1: refused
    assert _code(_serve(secure, 1, secure_stats.encode_mask_request(h, 2, names, public, [0.0] * len(feature_names)),
                        run_id)) == "secagg_refused"

    replies = [secure_stats.decode_reply(_serve(secure, i, secure_stats.encode_mask_request(h, 1, names, public),
                                                run_id)) for i in range(3)]
    vectors = [secagg.MaskedVector.from_dict({"site": r[0], "run_id": r[1]["run-id"], "round_id": r[1]["round-id"],
                                              "label": r[1]["label"], "sites_digest": r[1]["sites-digest"],
                                              "n_sites": r[1]["n-sites"], "frac_bits": r[1]["frac-bits"],
                                              "data": r[1]["data"]}) for r in replies]
    # the sites' true round-1 vectors, computed here from their own data (what a plain reply would carry)
    truths = []
    for adapter, name in zip(secure["adapters"], SITES, strict=True):
        site = load_site(adapter)
        prepared = load_prepared(secure["secure_prepared"] / name)
        reply = codec.decode_site_reply(site_statistics(prepared, site.min_cell_count, None, site=name))
        truths.append(secure_stats.round1_vector(reply.released, True))
    for vector, truth in zip(vectors, truths, strict=True):
        data = vector.data[:-1]
        plain_fixed = np.rint(truth * 2.0**vector.frac_bits).astype(np.int64).view(np.uint64)
        assert not np.any(data == plain_fixed)  # no value leaves in clear
        # as uniform on [0, 2^64): mean near 1/2, high bits balanced (n values, 4.5 sigma)
        u = data.astype(np.float64) / 2.0**64
        assert abs(u.mean() - 0.5) < 4.5 * np.sqrt(1 / 12 / u.size)
        assert abs(float(np.mean(data >> np.uint64(63))) - 0.5) < 4.5 * 0.5 / np.sqrt(u.size)
        # and decoding it as if it were plain gives nonsense: far from the site's true values
        as_plain = data.view(np.int64).astype(np.float64) / 2.0**vector.frac_bits
        assert np.median(np.abs(as_plain - truth)) > 1e6
    total = secagg.unmask_sum(vectors)
    np.testing.assert_allclose(total, np.sum(truths, axis=0), rtol=1e-12, atol=3 * 2.0**-24)
    # a second round-1 mask in the same run (e.g. with a site claimed dropped) is refused
    assert _code(_serve(secure, 0, secure_stats.encode_mask_request(h, 1, names, public), run_id)) == "secagg_refused"


def test_plain_statistics_of_a_secure_study_are_refused(secure) -> None:
    reply = _serve(secure, 0, codec.encode_stats_request(secure["secure_hash"]), 77, message_type=codec.STATS_QUERY)
    assert codec.decode_site_reply(reply).code == "settings_mismatch"
    # and a study without secure aggregation gets no query.secagg answer
    reply = _serve(secure, 0, secure_stats.encode_keys_request(secure["study_hash"]), 78,
                   prepared=secure["prepared_dir"])
    assert _code(reply) == "settings_mismatch"


def test_dropout_after_keys_loses_the_round(secure, tmp_path: Path) -> None:
    """A site that does not send its masked vector: the masks do not cancel, the sum is refused."""
    run_id = 5151
    h = secure["secure_hash"]
    keys = [secure_stats.decode_reply(_serve(secure, i, secure_stats.encode_keys_request(h), run_id))
            for i in range(3)]
    names, public = [k[0] for k in keys], [k[1]["public-key"] for k in keys]
    replies = [secure_stats.decode_reply(_serve(secure, i, secure_stats.encode_mask_request(h, 1, names, public),
                                                run_id)) for i in range(2)]  # site_c dropped
    vectors = [{"site": r[0], "run_id": r[1]["run-id"], "round_id": r[1]["round-id"], "label": r[1]["label"],
                "sites_digest": r[1]["sites-digest"], "n_sites": r[1]["n-sites"], "frac_bits": r[1]["frac-bits"],
                "data": r[1]["data"]} for r in replies]
    with pytest.raises(secagg.SecAggError, match="2 masked vectors for 3 sites"):
        secagg.unmask_sum(vectors)


def test_a_site_that_requires_secure_aggregation_refuses_a_study_without_it(secure) -> None:
    from omopfl.errors import ConfigError

    adapter = secure["tmp"] / "site_a_secagg_required.toml"
    adapter.write_text(secure["adapters"][0].read_text() + "\n[policy]\nsecure_aggregation_required = true\n")
    site = load_site(adapter)
    with pytest.raises(ConfigError, match="secure_aggregation_required"):
        policy.approve(site, load_study(secure["study"]))
    policy.approve(site, load_study(secure["secure_study"]))  # the secure study is fine


def test_training_runs_after_a_secure_statistics_phase(secure) -> None:
    from omopfl.federation.local import run_training

    run_dir = secure["tmp"] / "run_secure"
    manifest = run_training(secure["secure_study"], secure["adapters"], secure["secure_prepared"],
                            mode="inprocess", out_dir=run_dir, rounds=2)
    assert manifest["sites"] == list(SITES) and len(json_rounds(run_dir)) == 2
    assert manifest["stats_sites"]["persons"] == {}


def json_rounds(run_dir: Path) -> list[dict[str, Any]]:
    import json

    return json.loads((run_dir / "metrics.json").read_text())["rounds"]


@pytest.fixture(scope="module")
def pinned(secure) -> dict[str, Any]:
    """A study that pins the three sites' identity keys ([privacy.participants]), prepared and approved."""

    keys = {name: site_secure.identity_public_key(load_site(a)) for name, a in zip(SITES, secure["adapters"],
                                                                                  strict=True)}
    study = secure["tmp"] / "study_pinned.toml"
    study.write_text(secure["study"].read_text() + "\n[privacy]\nsecure_aggregation = true\n\n"
                     "[privacy.participants]\n" + "".join(f'{n} = "{k}"\n' for n, k in keys.items()))
    spec = load_study(study)
    assert dict(spec.privacy.participants) == keys
    prepared = secure["tmp"] / "prepared_pinned"
    prepare_and_approve(secure["adapters"], spec, prepared)
    return {"study": study, "prepared": prepared, "hash": spec.hash}


def test_pinned_participants_work_and_a_sybil_coordinator_is_refused(secure, pinned) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from omopfl.federation.local import run_stats

    result = run_stats(pinned["study"], secure["adapters"], pinned["prepared"], mode="inprocess",
                       out=secure["tmp"] / "pinned.json")
    assert result["secure_aggregation"]["contributed"] == 3 and result["scaler"] is not None

    # a coordinator that invents two participants (its own keys, signed by its own identity key) to isolate site_a
    run_id, h = 9191, pinned["hash"]
    keys = secure_stats.decode_reply(_serve(secure, 0, secure_stats.encode_keys_request(h), run_id,
                                            prepared=pinned["prepared"]))
    run = f"{h}:{run_id}"
    fake_identity = Ed25519PrivateKey.generate()
    names, public, signatures = [keys[0]], [keys[1]["public-key"]], [keys[1]["signature"]]
    for fake in ("site_b", "site_x"):  # a pinned name with a forged key, and an unknown name
        raw = X25519PrivateKey.generate().public_key().public_bytes(serialization.Encoding.Raw,
                                                                    serialization.PublicFormat.Raw)
        names.append(fake)
        public.append(raw.hex())
        signatures.append(fake_identity.sign(secagg.PublicKeyBundle(fake, run, raw).signed_bytes()).hex())
    request = secure_stats.encode_mask_request(h, 1, names, public, signatures=signatures)
    assert _code(_serve(secure, 0, request, run_id, prepared=pinned["prepared"])) == "secagg_refused"
    # only pinned names, but one key forged: the signature check refuses it
    request = secure_stats.encode_mask_request(h, 1, [*names[:2], "site_c"], public, signatures=signatures)
    assert _code(_serve(secure, 0, request, run_id, prepared=pinned["prepared"])) == "secagg_refused"


def test_cli_prints_the_sites_identity_key_as_a_study_line(secure, capsys) -> None:
    from conftest import run_omopfl

    code = run_omopfl(["sites", "identity", str(secure["adapters"][1])])
    out = capsys.readouterr().out.strip()
    assert code == 0 and out == f'site_b = "{site_secure.identity_public_key(load_site(secure["adapters"][1]))}"'
