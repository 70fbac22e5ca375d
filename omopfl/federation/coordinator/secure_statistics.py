"""Secure aggregation of the statistics phase, the coordinator's side: collect the keys, send the participant
list, add the masked vectors.  The protocol and its wire format: :mod:`omopfl.federation.codec_secure_statistics`."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Message

from omopfl import secagg
from omopfl.federation import codec
from omopfl.federation.codec_secure_statistics import (
    SECAGG_QUERY,
    decode_reply,
    encode_keys_request,
    encode_mask_request,
)

__all__ = ["secure_statistics"]

_log = logging.getLogger("flwr.omopfl")


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
            code = codec.scaler_ack_code(acks.get(node), site)
            if code:
                _log.warning("omopfl stats: site %s did not take the global scaler: %s", site, code)
            else:
                result["sites"]["scaler_acknowledged"].append(site)
                result["sites"]["scaler_nodes"][site] = int(node)
    _log.info("omopfl stats (secure aggregation): %d participants, %d contributing, %d failed", len(names),
              contributed, len(failed))
    return finish()
