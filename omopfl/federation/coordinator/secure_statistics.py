"""Secure aggregation of the statistics phase: the coordinator sees only sums of the sites' moments.

Used when the study asks for it (``[privacy] secure_aggregation = true``); every site then refuses plain
``query.stats`` for the study.  One message type, ``query.secagg``, in three steps:

1. ``keys``: each site makes a fresh X25519 key pair for this run (kept in its state folder,
   ``secagg/<study hash>-<run id>.json``, 0600) and replies with its name, its public key and its
   feature names.
2. ``mask`` round 1: the coordinator sends every site the participant list (site names and public
   keys, as the sites published them).  A site checks the list (its own name and key in it, at
   least ``max(3, the study's min_sites)`` distinct sites), computes its statistics release exactly as
   for ``query.stats`` (the release rule, the study's DP, the budget ledger), keeps it in its state
   file, and sends the masked vector ``[contributed, persons, n..., n*mean...]`` (a withheld site or
   feature contributes zeros).  The coordinator adds the vectors (:func:`omopfl.secagg.unmask_sum`):
   the pooled count, the number of contributing sites and the pooled mean.
3. ``mask`` round 2: the coordinator sends the pooled mean ``c``; each site sends the masked
   ``m2 + n * (mean - c)**2`` of the same release; the sum is the pooled ``M2`` (Chan's merge in sum form,
   around the pooled mean, so no cancellation).  The site deletes its key.

Then the global scaler goes to the participants as in the plain phase (``query.scaler``).

Each site masks round 1 and round 2 once per run (a second request is refused with
``secagg_refused``): the coordinator cannot collect two sums over different participant sets in one
run, nor two round-2 sums around different centres.

Dropout: there is no dropout tolerance.  If a participant's masked vector does not arrive, the
round's sum is lost; the phase fails (no scaler, the run stops) and the coordinator's log names the
sites that did not send.  Start a new run with the sites that remain: a site never re-masks within a run.

What the coordinator learns: the sums, the number of contributing sites (not which), the participant
names and public keys.  Not: any site's persons, counts or moments, nor which site withheld.  Caveats:
a feature released by one site only has that site's values as its sum; with the other sites' true
sums (e.g. a coordinator that also runs sites) one site's values follow; and a coordinator that
simulates fake participants (Sybil: it makes key pairs for invented sites and masks zeros for them)
isolates a real site's vector.  The participant check (at least three listed sites, the site itself
among them) does not stop that; pinning the participants' identity keys in the approved study does
(``[privacy.participants]``: each site signs its run key with its Ed25519 identity key and checks the
others' signatures against the pinned keys, :meth:`omopfl.secagg.SecAggSession.set_peer_keys`
``trusted``; ``omopfl sites identity`` prints a site's key).  Across runs, sums over different
participant sets still differ by one site; DP on the statistics (``statistics_epsilon``) bounds what that reveals.

This module is the coordinator's side and the wire format; the site's side is in
:mod:`omopfl.federation.site.app` (it imports this module for the codec only).  Imports: Flower's
records, numpy, :mod:`omopfl.secagg`, :mod:`omopfl.moments` (pure).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from omopfl import secagg
from omopfl.federation import codec

__all__ = ["SECAGG_QUERY", "SecAggRequest", "encode_keys_request", "encode_mask_request", "decode_request",
           "encode_keys_reply", "encode_masked_reply", "decode_reply", "secure_statistics", "round1_vector",
           "round2_vector"]

_log = logging.getLogger("flwr.omopfl")

SECAGG_QUERY = "query.secagg"
_RECORD = "omopfl.secagg"
FRAC_BITS = secagg.DEFAULT_FRAC_BITS


@dataclass(frozen=True)
class SecAggRequest:
    """What the coordinator asks in ``query.secagg``."""

    study_hash: str
    phase: str  # "keys", "mask" or "train-keys"
    round: int = 0
    sites: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    centre: tuple[float, ...] = ()
    signatures: tuple[str, ...] = ()


def encode_keys_request(study_hash: str) -> RecordDict:
    return RecordDict({_RECORD: ConfigRecord({"protocol": codec.PROTOCOL, "study-hash": study_hash,
                                              "phase": "keys"})})


def encode_mask_request(study_hash: str, server_round: int, sites: Sequence[str], keys: Sequence[str],
                        centre: Sequence[float] = (), signatures: Sequence[str] | None = None) -> RecordDict:
    return RecordDict({_RECORD: ConfigRecord({
        "protocol": codec.PROTOCOL, "study-hash": study_hash, "phase": "mask", "round": int(server_round),
        "sites": list(sites), "keys": list(keys), "centre": [float(v) for v in centre],
        "signatures": list(signatures) if signatures is not None else [""] * len(sites)})})


def decode_request(content: RecordDict) -> SecAggRequest:
    """Inverse of the two encoders; :class:`codec.CodecError` on anything else."""
    if set(content.keys()) != {_RECORD} or not isinstance(content.get(_RECORD), ConfigRecord):
        raise codec.CodecError(f"a {SECAGG_QUERY} message holds exactly the record {_RECORD!r}")
    record = content[_RECORD]
    if record.get("protocol") != codec.PROTOCOL:
        raise codec.CodecError(f"record {_RECORD!r}: unknown protocol")
    study_hash, phase = record.get("study-hash"), record.get("phase")
    if not isinstance(study_hash, str) or not isinstance(phase, str):
        raise codec.CodecError(f"record {_RECORD!r} needs study-hash and phase")
    # train-keys: the training key round (omopfl.federation.coordinator.secure_rounds)
    if phase in ("keys", "train-keys"):
        if set(record.keys()) != {"protocol", "study-hash", "phase"}:
            raise codec.CodecError(f"record {_RECORD!r}: unknown keys in a keys request")
        return SecAggRequest(study_hash, phase)
    if phase != "mask" or set(record.keys()) != {"protocol", "study-hash", "phase", "round", "sites", "keys",
                                                   "centre", "signatures"}:
        raise codec.CodecError(f"record {_RECORD!r}: phase must be keys or mask, with its keys")
    server_round, sites, keys = record["round"], record["sites"], record["keys"]
    centre, signatures = record["centre"], record["signatures"]
    if not isinstance(signatures, list) or not isinstance(sites, list) or len(signatures) != len(sites):
        raise codec.CodecError(f"record {_RECORD!r}: one signature (or empty string) per site")
    if isinstance(server_round, bool) or server_round not in (1, 2):
        raise codec.CodecError(f"record {_RECORD!r} key 'round' must be 1 or 2")
    if (not isinstance(sites, list) or not isinstance(keys, list) or len(sites) != len(keys)
            or not all(isinstance(v, str) for v in [*sites, *keys])):
        raise codec.CodecError(f"record {_RECORD!r}: sites and keys must be string lists of one length")
    if not isinstance(centre, list) or not all(isinstance(v, float) for v in centre):
        raise codec.CodecError(f"record {_RECORD!r} key 'centre' must be a list of floats")
    if not all(isinstance(v, str) for v in signatures):
        raise codec.CodecError(f"record {_RECORD!r}: signatures must be strings")
    return SecAggRequest(study_hash, phase, int(server_round), tuple(sites), tuple(keys), tuple(centre),
                         tuple(signatures))


def encode_keys_reply(site: str, public_key: bytes, feature_names: Sequence[str],
                      signature: bytes = b"") -> RecordDict:
    return RecordDict({_RECORD: ConfigRecord({"protocol": codec.PROTOCOL, "site": site, "status": "ok",
                                              "public-key": public_key.hex(), "signature": signature.hex(),
                                              "feature-names": list(feature_names)})})


def encode_masked_reply(masked: secagg.MaskedVector) -> RecordDict:
    d = masked.to_dict()
    return RecordDict({_RECORD: ConfigRecord({
        "protocol": codec.PROTOCOL, "site": d["site"], "status": "ok", "run-id": d["run_id"],
        "round-id": d["round_id"], "label": d["label"], "sites-digest": d["sites_digest"],
        "n-sites": d["n_sites"], "frac-bits": d["frac_bits"], "data": d["data"]})})


def decode_reply(content: RecordDict) -> tuple[str, dict[str, Any]] | codec.SiteReply:
    """A site's ``query.secagg`` reply: ``(site, fields)``, or the decoded error reply (fixed code)."""
    if _RECORD not in content:
        return codec.decode_site_reply(content)
    if set(content.keys()) != {_RECORD}:
        raise codec.CodecError(f"a {SECAGG_QUERY} reply holds exactly the record {_RECORD!r}")
    record = dict(content[_RECORD])
    site = record.get("site")
    if record.get("protocol") != codec.PROTOCOL or not isinstance(site, str) or record.get("status") != "ok":
        raise codec.CodecError(f"record {_RECORD!r}: bad protocol, site or status")
    return site, record


def round1_vector(released: Any, contributed: bool) -> np.ndarray:
    """``[contributed, persons, n..., n*mean...]`` of a site's release (:class:`omopfl.suppression.Released`)."""
    m = released.to_moments()
    k = len(m.feature_names)
    if not contributed:
        return np.zeros(2 + 2 * k)
    n = m.n.astype(np.float64)
    return np.concatenate([[1.0, float(m.persons)], n, n * m.mean])


def round2_vector(released: Any, contributed: bool, centre: Sequence[float]) -> np.ndarray:
    """``m2 + n * (mean - c)**2`` per feature: the site's squared deviations around the pooled mean ``c``."""
    m = released.to_moments()
    c = np.asarray(centre, dtype=np.float64)
    if c.size != len(m.feature_names):
        raise secagg.SecAggError(f"centre has {c.size} values for {len(m.feature_names)} features")
    if not contributed:
        return np.zeros(c.size)
    d = m.mean - c
    return np.where(m.n > 0, m.m2 + m.n * d * d, 0.0)


def _exchange(grid: Any, nodes: Sequence[int], content_for: Any, timeout: float,
              audit: list[dict[str, Any]] | None) -> dict[int, Message]:
    messages = [Message(content_for(node), dst_node_id=node, message_type=SECAGG_QUERY, group_id=SECAGG_QUERY)
                for node in nodes]
    replies: dict[int, Message] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        replies[reply.metadata.src_node_id] = reply
        if audit is not None:
            audit.append(codec.audit_entry(reply, SECAGG_QUERY))
    return replies


def _masked(replies: Mapping[int, Message], participants: Mapping[int, str], failed: list[dict[str, Any]],
            what: str) -> list[secagg.MaskedVector] | None:
    vectors = []
    lost = []
    for node, site in participants.items():
        reply = replies.get(node)
        try:
            if reply is None:
                raise LookupError("no reply")
            if reply.has_error():
                raise LookupError(f"flower_error_{int(reply.error.code)}")
            decoded = decode_reply(reply.content)
            if isinstance(decoded, codec.SiteReply):
                raise LookupError(decoded.code or "malformed")
            name, record = decoded
            if name != site:
                raise LookupError("malformed")
            vectors.append(secagg.MaskedVector.from_dict({
                "site": name, "run_id": record.get("run-id"), "round_id": record.get("round-id"),
                "label": record.get("label"), "sites_digest": record.get("sites-digest"),
                "n_sites": record.get("n-sites"), "frac_bits": record.get("frac-bits"), "data": record.get("data")}))
        except (LookupError, codec.CodecError, secagg.SecAggError) as exc:
            code = exc.args[0] if isinstance(exc, LookupError) else "malformed"
            lost.append(site)
            failed.append({"site": site, "node": node, "code": code})
    if lost:
        _log.warning("omopfl stats: secure aggregation %s lost: %s sent no masked vector (no dropout tolerance; "
                     "start a new run without them)", what, ", ".join(lost))
        return None
    return vectors


def secure_statistics(grid: Any, settings: Any, nodes: list[int], audit: list[dict[str, Any]] | None,
                      started: float, waited: float) -> dict[str, Any]:
    """The statistics phase by secure aggregation (module docstring); the same result shape as the plain
    :func:`omopfl.federation.coordinator.statistics.federated_statistics`, with ``sites.contributing`` the
    participants, ``sites.persons`` empty and ``secure_aggregation`` describing the sums."""
    from omopfl.atomic import write_json
    from omopfl.moments import Moments, Scaler, finalize

    failed: list[dict[str, Any]] = []
    result: dict[str, Any] = {
        "version": 1, "study_hash": settings.study_hash,
        "dp": None if settings.dp is None else {"epsilon": settings.dp.epsilon, "delta": settings.dp.delta},
        "global": None, "scaler": None,
        "sites": {"connected": len(nodes), "contributing": [], "withheld": [], "failed": failed, "no_reply": [],
                  "persons": {}, "suppressed": {}, "scaler_acknowledged": [], "scaler_nodes": {}},
        "secure_aggregation": {"participants": [], "contributed": None, "rounds": 0},
    }

    def finish() -> dict[str, Any]:
        failed.sort(key=lambda e: (e["site"] or "", e["node"]))
        result["seconds"] = {"wait_for_sites": round(waited, 3), "total": round(time.monotonic() - started, 3)}
        if settings.result_path:
            write_json(settings.result_path, result)
        if audit is not None:
            write_json(settings.audit_path, {"version": 1, "replies": audit})
        return result

    keys = _exchange(grid, nodes, lambda _n: encode_keys_request(settings.study_hash), settings.timeout, audit)
    result["sites"]["no_reply"] = [n for n in nodes if n not in keys]
    published: dict[int, tuple[str, str, tuple[str, ...]]] = {}
    signed: dict[int, str] = {}
    for node in nodes:
        reply = keys.get(node)
        if reply is None:
            continue
        try:
            if reply.has_error():
                failed.append({"site": None, "node": node, "code": f"flower_error_{int(reply.error.code)}"})
                continue
            decoded = decode_reply(reply.content)
            if isinstance(decoded, codec.SiteReply):
                failed.append({"site": decoded.site or None, "node": node, "code": decoded.code or "malformed"})
                continue
            site, record = decoded
            names = record.get("feature-names")
            key = record.get("public-key")
            if not isinstance(key, str) or not isinstance(names, list):
                raise codec.CodecError("a keys reply needs public-key and feature-names")
            published[node] = (site, key, tuple(str(v) for v in names))
            signature = record.get("signature", "")
            signed[node] = signature if isinstance(signature, str) else ""
        except codec.CodecError:
            failed.append({"site": None, "node": node, "code": "malformed"})
    by_name: dict[str, int] = {}
    for node, (site, _key, _names) in sorted(published.items()):
        if site in by_name:
            failed.append({"site": site, "node": node, "code": "duplicate_site"})
            published.pop(node)
        else:
            by_name[site] = node
    feature_sets = {names for _s, _k, names in published.values()}
    if len(feature_sets) > 1:
        for node, (site, _k, _names) in published.items():
            failed.append({"site": site, "node": node, "code": "feature_mismatch"})
        _log.warning("omopfl stats: the sites' features differ: no secure aggregation")
        return finish()
    participants = {node: published[node][0] for node in sorted(published, key=lambda n: published[n][0])}
    need = max(secagg.MIN_SITES, settings.min_sites)
    result["secure_aggregation"]["participants"] = list(participants.values())
    if len(participants) < need:
        _log.warning("omopfl stats: %d site(s) published keys, fewer than the %d secure aggregation needs",
                     len(participants), need)
        return finish()
    names = list(participants.values())
    public = [published[n][1] for n in participants]
    signatures = [signed.get(n, "") for n in participants]
    reference = next(iter(feature_sets))
    k = len(reference)

    first = _exchange(grid, list(participants), lambda _n: encode_mask_request(settings.study_hash, 1, names, public,
                                                                    signatures=signatures),
                      settings.timeout, audit)
    vectors = _masked(first, participants, failed, "round 1")
    if vectors is None:
        return finish()
    try:
        total1 = secagg.unmask_sum(vectors)
    except secagg.SecAggError as exc:
        _log.warning("omopfl stats: secure aggregation round 1: %s", exc)
        return finish()
    contributed, persons = int(np.rint(total1[0])), int(np.rint(total1[1]))
    n = np.rint(total1[2:2 + k]).astype(np.int64)
    s1 = total1[2 + k:]
    centre = np.divide(s1, n, out=np.zeros(k), where=n > 0)
    second = _exchange(grid, list(participants),
                       lambda _n: encode_mask_request(settings.study_hash, 2, names, public, centre.tolist(),
                                                      signatures),
                       settings.timeout, audit)
    vectors = _masked(second, participants, failed, "round 2")
    if vectors is None:
        return finish()
    try:
        m2 = np.maximum(secagg.unmask_sum(vectors), 0.0)
    except secagg.SecAggError as exc:
        _log.warning("omopfl stats: secure aggregation round 2: %s", exc)
        return finish()
    result["secure_aggregation"].update(contributed=contributed, rounds=2)
    result["sites"]["contributing"] = names
    if contributed == 0:
        _log.warning("omopfl stats: no site contributed statistics")
        return finish()
    merged = Moments(n, np.where(n > 0, centre, 0.0), np.where(n > 0, m2, 0.0), reference, persons)
    mean, std = finalize(merged, ddof=1)
    scaler = Scaler.from_moments(merged, ddof=1)
    result["global"] = {"persons": persons, "feature_names": list(reference), "n": [int(v) for v in n],
                        "mean": codec.finite_list(mean), "std": codec.finite_list(std),
                        "scale": [float(v) for v in scaler.scale]}
    if contributed < settings.min_contributing:
        _log.warning("omopfl stats: %d site(s) contributed, fewer than min-contributing %d: no scaler",
                     contributed, settings.min_contributing)
        return finish()
    global_scaler = codec.GlobalScaler.build(scaler, merged.n, merged.persons, settings.study_hash)
    result["scaler"] = global_scaler.to_dict()
    if settings.send_scaler:
        content = codec.encode_scaler(global_scaler)
        acks: dict[int, Message] = {}
        messages = [Message(content, dst_node_id=node, message_type=codec.SCALER_QUERY, group_id=codec.SCALER_QUERY)
                    for node in participants]
        for reply in grid.send_and_receive(messages, timeout=settings.timeout):
            acks[reply.metadata.src_node_id] = reply
            if audit is not None:
                audit.append(codec.audit_entry(reply, codec.SCALER_QUERY))
        for node, site in participants.items():
            reply = acks.get(node)
            code = "no_reply"
            if reply is not None and not reply.has_error():
                try:
                    ack = codec.decode_site_reply(reply.content)
                    code = "" if ack.status == "ok" and ack.site == site else (ack.code or "malformed")
                except codec.CodecError:
                    code = "malformed"
            if code:
                _log.warning("omopfl stats: site %s did not take the global scaler: %s", site, code)
            else:
                result["sites"]["scaler_acknowledged"].append(site)
                result["sites"]["scaler_nodes"][site] = int(node)
    _log.info("omopfl stats (secure aggregation): %d participants, %d contributing, %d failed", len(names),
              contributed, len(failed))
    return finish()
