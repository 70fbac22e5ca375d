"""The site's side of secure aggregation: its identity key, the run keys, the participant checks, the masked
releases (statistics: :mod:`omopfl.federation.codec_secure_statistics`; training updates:
:mod:`omopfl.federation.codec_secure_rounds`).

Every key and release between steps stays in the site's state folder (0600); a step answered once per run;
the participant list must name this site with its own key and at least ``max(3, the study's min_sites)``
distinct sites, only pinned ones when the study pins ``[privacy.participants]``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, RecordDict

from omopfl import policy, release
from omopfl.atomic import write_json
from omopfl.config import SiteConfig
from omopfl.errors import Refusal, SiteFailure
from omopfl.federation import codec
from omopfl.federation.site.admission import (
    admit_stats,
    admit_training,
    study_ledger,
    study_privacy,
)
from omopfl.federation.site.statistics import stats_reply
from omopfl.federation.site.worker import handle

__all__ = ["secagg_state", "identity_key", "identity_public_key", "secagg_query", "train_state", "train_run",
           "train_keys", "participants_session", "secagg_train"]

_log = logging.getLogger("omopfl.site")


def secagg_state(site: SiteConfig, approved: policy.ApprovedStudy, run_id: int) -> Path:
    return policy.state_dir(site) / "secagg" / f"{approved.hash[:32]}-{int(run_id)}.json"


def identity_key(site: SiteConfig) -> Any:
    """The site's long-lived Ed25519 identity key for secure aggregation (made on first use, state folder)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = policy.state_dir(site) / "secagg" / "identity.json"
    if path.is_file():
        return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(json.loads(path.read_text())["key"]))
    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    write_json(path, private=True, data={"key": raw.hex()})
    return key


def identity_public_key(site: SiteConfig) -> str:
    """The site's Ed25519 identity public key (hex), to pin in a study's ``[privacy.participants]``."""
    from cryptography.hazmat.primitives import serialization

    return identity_key(site).public_key().public_bytes(serialization.Encoding.Raw,
                                                         serialization.PublicFormat.Raw).hex()


def secagg_query(content: RecordDict, context: Context, site: SiteConfig, approved: policy.ApprovedStudy, run_id: int,
            spent: dict[str, float]) -> RecordDict:
    """The site's side of :mod:`omopfl.federation.coordinator.secure_statistics`: publish a run key, then mask
    its release.

    The run's X25519 private key and the release stay in the site's state folder between the steps; each
    mask round is answered once per run; the participant list must name this site with its own key and
    at least ``max(3, the study's min_sites)`` distinct sites.  The release is the one ``query.stats``
    would send (release rule, the study's DP charged to the ledger once)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from omopfl import secagg
    from omopfl.federation import codec_secure_statistics as secure_stats
    from omopfl.suppression import Released

    if not study_privacy(approved).get("secure_aggregation"):
        raise Refusal("settings_mismatch")
    request = secure_stats.decode_request(content)
    if request.phase == "train-keys":
        return train_keys(site, approved, run_id)
    path = secagg_state(site, approved, run_id)
    run = f"{approved.hash}:{int(run_id)}"
    if request.phase == "keys":
        if path.is_file():  # one key per run: a second key set would allow sums over other participant sets
            raise SiteFailure("secagg_refused")
        # the release is made once, now, as query.stats would send it (release rule; DP charged once)
        dp = None
        privacy = study_privacy(approved)
        if privacy.get("statistics_epsilon") is not None:
            bounds = {str(k): (float(v[0]), float(v[1])) for k, v in dict(privacy.get("bounds") or {}).items()}
            dp = codec.DPRequest(float(privacy["statistics_epsilon"]), float(privacy["delta"]), bounds)
        plain = codec.encode_stats_request(approved.hash, dp)
        dp = admit_stats(plain, site, approved)
        reply = stats_reply(plain, context, site, approved.summary, dp=dp)
        release.check_reply("query.stats", {name: dict(record) for name, record in reply.items()},
                            site.min_cell_count)
        decoded = codec.decode_site_reply(reply)
        if decoded.status == "error":
            raise SiteFailure(decoded.code)
        contributed = decoded.status == "ok" and decoded.released is not None
        if dp is not None and contributed:
            ledger, _limit = study_ledger(site, approved)
            spent.update(epsilon=dp.epsilon, epsilon_total=ledger.charge(statistics=dp.epsilon))
        private = X25519PrivateKey.generate()
        raw = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                    serialization.NoEncryption())
        record = decoded.released.to_record() if contributed and decoded.released is not None else None
        write_json(path, private=True, data={"key": raw.hex(), "rounds": [], "names": list(decoded.feature_names),
                              "release": record})
        public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        signature = identity_key(site).sign(secagg.PublicKeyBundle(site.name, run, public).signed_bytes())
        return secure_stats.encode_keys_reply(site.name, public, list(decoded.feature_names), signature)
    if not path.is_file():
        raise SiteFailure("secagg_refused")
    state = json.loads(path.read_text())
    if request.round in state["rounds"] or (request.round == 2 and 1 not in state["rounds"]):
        raise SiteFailure("secagg_refused")
    private = X25519PrivateKey.from_private_bytes(bytes.fromhex(state["key"]))
    session = participants_session(site, approved, run, private, request.sites, request.keys, request.signatures,
                                    secure_stats.FRAC_BITS)
    k = len(state["names"])
    try:
        released = None if state["release"] is None else Released.from_record(state["release"])
        if request.round == 1:
            vector = np.zeros(2 + 2 * k) if released is None else secure_stats.round1_vector(released, True)
        else:
            if len(request.centre) != k:
                raise secagg.SecAggError(f"centre has {len(request.centre)} values for {k} features")
            vector = np.zeros(k) if released is None else secure_stats.round2_vector(released, True,
                                                                                     request.centre)
        masked = session.mask(vector, f"round-{request.round}", "moments")
    except secagg.SecAggError as exc:
        _log.warning("omopfl site %s: secure aggregation refused: %s", site.name, exc)
        raise SiteFailure("secagg_refused") from None
    state["rounds"].append(request.round)
    if request.round == 2:
        path.unlink()  # the run's key is not needed any more
    else:
        write_json(path, private=True, data=state)
    return secure_stats.encode_masked_reply(masked)


def train_state(site: SiteConfig, approved: policy.ApprovedStudy, run_id: int) -> Path:
    return policy.state_dir(site) / "secagg" / f"{approved.hash[:32]}-{int(run_id)}-train.json"


def train_run(approved: policy.ApprovedStudy, run_id: int) -> str:
    return f"{approved.hash}:{int(run_id)}:train"


def train_keys(site: SiteConfig, approved: policy.ApprovedStudy, run_id: int) -> RecordDict:
    """The training key round: one fresh X25519 key per run (a second request is refused: no re-keying)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from omopfl import secagg
    from omopfl.federation import codec_secure_statistics as secure_stats

    path = train_state(site, approved, run_id)
    if path.is_file():
        _log.warning("omopfl site %s: secure aggregation refused: a second training key round in run %d", site.name,
                     int(run_id))
        raise SiteFailure("secagg_refused")
    private = X25519PrivateKey.generate()
    raw = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
    write_json(path, private=True, data={"key": raw.hex(), "participants": None, "rounds": []})
    public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    signature = identity_key(site).sign(secagg.PublicKeyBundle(site.name, train_run(approved, run_id),
                                                                public).signed_bytes())
    return secure_stats.encode_keys_reply(site.name, public, [], signature)


def participants_session(site: SiteConfig, approved: policy.ApprovedStudy, run: str, private: Any,
                          sites: tuple[str, ...], keys: tuple[str, ...], signatures: tuple[str, ...],
                          frac_bits: int) -> Any:
    """A :class:`omopfl.secagg.SecAggSession` over the listed participants, after the site's checks: distinct
    names, this site among them, at least ``max(3, min_sites)``, only pinned names with their signatures when
    the study pins ``[privacy.participants]``.  Raises ``SiteFailure("secagg_refused")``."""
    from omopfl import secagg

    need = max(secagg.MIN_SITES, int(approved.summary.get("training", {}).get("min_sites") or 1))
    if len(set(sites)) != len(sites) or len(sites) < need or site.name not in sites:
        _log.warning("omopfl site %s: secure aggregation refused: %d participant(s) listed, %d needed, this site "
                     "%s", site.name, len(set(sites)), need, "listed" if site.name in sites else "not listed")
        raise SiteFailure("secagg_refused")
    pinned = dict(study_privacy(approved).get("participants") or {})
    trusted = None
    if pinned:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        if any(name not in pinned for name in sites):
            _log.warning("omopfl site %s: secure aggregation refused: a participant is not pinned in the study",
                         site.name)
            raise SiteFailure("secagg_refused")
        trusted = {name: Ed25519PublicKey.from_public_bytes(bytes.fromhex(key)) for name, key in pinned.items()}
    try:
        session = secagg.SecAggSession(site.name, sites, run, private_key=private, frac_bits=frac_bits)
        session.set_peer_keys([{"site": name, "run_id": run, "public_key": key, "signature": signature}
                               for name, key, signature in zip(sites, keys, signatures, strict=True)],
                              trusted=trusted)
    except secagg.SecAggError as exc:
        _log.warning("omopfl site %s: secure aggregation refused: %s", site.name, exc)
        raise SiteFailure("secagg_refused") from None
    return session


def secagg_train(content: RecordDict, context: Context, site: SiteConfig, approved: policy.ApprovedStudy,
                  run_id: int, spent: dict[str, float]) -> RecordDict:
    """A ``train`` reply of a secure-aggregation study: only the masked update (and the released evaluation).

    Checked before training: the run's training key exists (``train-keys``), the participant list passes
    :func:`participants_session` and equals the first masked round's, this round was not masked yet (and
    :func:`admit_training` bounds it by the study's rounds).  The plain reply never leaves the site."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from omopfl import secagg
    from omopfl.federation import codec_secure_rounds as secure_train
    from omopfl.federation import codec_secure_statistics as secure_stats

    request = secure_train.decode_train_request(content)
    admitted = admit_training("train", content, context, site, approved, run_id)
    server_round = int(admitted.config_records[codec.TRAIN_CONFIG]["server-round"])
    path = train_state(site, approved, run_id)
    if not path.is_file():
        _log.warning("omopfl site %s: secure aggregation refused: no training key round in run %d", site.name,
                     int(run_id))
        raise SiteFailure("secagg_refused")
    state = json.loads(path.read_text())
    listed = {"sites": list(request.sites), "keys": list(request.keys)}
    if server_round in state["rounds"] or not state.get("key"):
        _log.warning("omopfl site %s: secure aggregation refused: round %d was masked already", site.name,
                     server_round)
        raise SiteFailure("secagg_refused")
    if state["participants"] is not None and state["participants"] != listed:
        _log.warning("omopfl site %s: secure aggregation refused: the participants differ from the run's first "
                     "round", site.name)
        raise SiteFailure("secagg_refused")
    private = X25519PrivateKey.from_private_bytes(bytes.fromhex(state["key"]))
    session = participants_session(site, approved, train_run(approved, run_id), private, request.sites,
                                    request.keys, request.signatures, secure_train.FRAC_BITS)
    received = admitted.array_records.get(codec.TRAIN_ARRAYS)
    if received is None:
        raise codec.CodecError("arrays record missing")
    plain = handle("train", admitted, context)
    try:
        vector, _n = secure_train.train_vector(plain, received)
        masked = session.mask(vector, secure_train.round_id(server_round), secure_train.LABEL)
    except secagg.SecAggError as exc:
        _log.warning("omopfl site %s: secure aggregation refused in round %d: %s", site.name, server_round, exc)
        raise SiteFailure("secagg_refused") from None
    # DP-SGD's epsilon is not sent with a masked update: the audit log shows it (_handle)
    state["rounds"].append(server_round)
    state["participants"] = listed
    if server_round >= int(approved.settings["rounds"]):
        state["key"] = ""  # the study's last round: the key is not needed any more
    write_json(path, private=True, data=state)
    reply = secure_stats.encode_masked_reply(masked)
    if codec.TRAIN_EVALUATE in plain.metric_records:  # the released evaluation of the received model (clear)
        reply[codec.TRAIN_EVALUATE] = plain.metric_records[codec.TRAIN_EVALUATE]
    return reply
