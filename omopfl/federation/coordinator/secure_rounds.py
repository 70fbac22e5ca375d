"""Secure aggregation of training weights, the coordinator's side: the key round, the participant list on
every ``train`` message, the unmasked sum of each round.  The protocol and its wire format:
:mod:`omopfl.federation.codec_secure_rounds`."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict

from omopfl import secagg
from omopfl.federation import codec
from omopfl.federation import codec_secure_statistics as secure_stats
from omopfl.federation.codec_secure_rounds import (
    LABEL,
    LANES,
    TRAIN_RECORD,
    Participants,
    encode_keys_request,
    encode_train_request,
    round_id,
)

__all__ = ["collect_keys", "attach", "unmask_round"]

_log = logging.getLogger("flwr.omopfl")


# --------------------------------------------------------------------------------------------
# the coordinator's side
# --------------------------------------------------------------------------------------------


def collect_keys(grid: Any, sites: Mapping[str, int], study_hash: str, timeout: float) -> tuple[Participants,
                                                                                              dict[str, str]]:
    """The key round: ``(participants, {site: reason})`` of the sites that published a key / did not."""
    content = encode_keys_request(study_hash)
    names = {node: name for name, node in sites.items()}
    messages = [Message(content, dst_node_id=node, message_type=secure_stats.SECAGG_QUERY,
                        group_id=secure_stats.SECAGG_QUERY) for node in sites.values()]
    replies = {r.metadata.src_node_id: r for r in grid.send_and_receive(messages, timeout=timeout)}
    published: dict[str, tuple[int, str, str]] = {}
    failed: dict[str, str] = {}
    for node, name in names.items():
        reply = replies.get(node)
        if reply is None:
            failed[name] = "no key within the timeout"
            continue
        if reply.has_error():
            failed[name] = f"error reply (Flower error code {int(reply.error.code)})"
            continue
        try:
            decoded = secure_stats.decode_reply(reply.content)
        except codec.CodecError:
            failed[name] = "malformed"
            continue
        if isinstance(decoded, codec.SiteReply):
            failed[name] = codec.ERROR_TEXT.get(decoded.code or "", decoded.code or "malformed")
            continue
        site, record = decoded
        key, signature = record.get("public-key"), record.get("signature", "")
        if site != name or not isinstance(key, str):
            failed[name] = "malformed"
            continue
        published[site] = (node, key, signature if isinstance(signature, str) else "")
    order = sorted(published)
    return Participants(tuple(order), tuple(published[s][1] for s in order), tuple(published[s][2] for s in order),
                        tuple(published[s][0] for s in order)), failed


def attach(messages: Sequence[Message], participants: Participants) -> None:
    """Put the participant list into every train message."""
    for message in messages:
        message.content[TRAIN_RECORD] = encode_train_request(participants)


def unmask_round(replies: Sequence[Message], participants: Participants, server_round: int,
                 current: ArrayRecord) -> tuple[ArrayRecord, dict[str, Any]]:
    """The FedAvg mean of the masked train replies and ``{trained, n, loss}``; raises
    :class:`omopfl.errors.RoundsFailed` when a participant's vector is missing or the masks do
    not cancel (no dropout tolerance)."""
    from flwr.app import Array

    from omopfl.errors import RoundsFailed

    by_node = {r.metadata.src_node_id: r for r in replies}
    vectors, lost = [], []
    for name, node in zip(participants.sites, participants.nodes, strict=True):
        reply = by_node.get(node)
        try:
            if reply is None or reply.has_error():
                raise LookupError("no reply")
            masked = reply.content.config_records["omopfl.secagg"]
            decoded = secure_stats.decode_reply(RecordDict({"omopfl.secagg": masked}))
            if isinstance(decoded, codec.SiteReply) or decoded[0] != name:
                raise LookupError("malformed")
            record = decoded[1]
            vectors.append(secagg.MaskedVector.from_dict({
                "site": name, "run_id": record.get("run-id"), "round_id": record.get("round-id"),
                "label": record.get("label"), "sites_digest": record.get("sites-digest"),
                "n_sites": record.get("n-sites"), "frac_bits": record.get("frac-bits"), "data": record.get("data")}))
        except (LookupError, KeyError, codec.CodecError, secagg.SecAggError):
            lost.append(name)
    if lost:
        raise RoundsFailed(f"round {server_round}: secure aggregation lost: {', '.join(lost)} sent no masked update "
                           "(no dropout tolerance; start a new run without them)")
    try:
        total = secagg.unmask_sum(vectors)
    except secagg.SecAggError as exc:
        raise RoundsFailed(f"round {server_round}: secure aggregation failed: {exc}") from None
    if any(v.round_id != round_id(server_round) or v.label != LABEL for v in vectors):
        raise RoundsFailed(f"round {server_round}: a masked update is of another round")
    trained, n = int(np.rint(total[0])), int(np.rint(total[1]))
    loss_weight, loss_sum = float(total[2]), float(total[3])
    if n <= 0 or trained <= 0:
        raise RoundsFailed(f"round {server_round}: no site had enough rows to train on (min_cell_count)")
    flat = total[LANES:] / float(n)
    out: dict[str, Array] = {}
    offset = 0
    for key, array in current.items():
        size = int(np.prod(array.shape))
        if offset + size > flat.size:
            raise RoundsFailed(f"round {server_round}: the summed update has the wrong length")
        reference = array.numpy()
        out[key] = Array(np.ascontiguousarray(flat[offset:offset + size].reshape(reference.shape)
                                              .astype(reference.dtype)))
        offset += size
    if offset != flat.size:
        raise RoundsFailed(f"round {server_round}: the summed update has the wrong length")
    metrics = {"trained": trained, "n": n, "loss": loss_sum / loss_weight if loss_weight > 0 else None}
    return ArrayRecord(out), metrics
