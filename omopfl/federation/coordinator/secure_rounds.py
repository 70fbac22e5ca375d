"""Secure aggregation of training weights: the coordinator sees only the sums of the sites' updates.

Used when the approved study says ``[privacy] secure_aggregation = true`` (the statistics phase is then
masked too, :mod:`omopfl.federation.coordinator.secure_statistics`).  Same construction
(:mod:`omopfl.secagg`: X25519 pair keys, ChaCha20 masks mod 2^64, optional pinned Ed25519 participants),
the same site trust boundary (:func:`omopfl.federation.site.app._secagg_train`).

Protocol
    1. Key round, once at the start of training (also on resume): ``query.secagg`` phase ``train-keys``.
       Each site makes a fresh X25519 key pair for this run's training (state folder,
       ``secagg/<study hash>-<run id>-train.json``), signs it with its identity key and replies name + public
       key.  A second ``train-keys`` in the same run is refused (``secagg_refused``): no re-keying mid-run.
    2. Every ``train`` message carries the participant list (record ``omopfl.secagg-train``: names, public
       keys, signatures as published).  The site checks it (itself listed with its own key, at least
       ``max(3, the study's min_sites)`` distinct names, only pinned names with valid signatures when the
       study pins ``[privacy.participants]``, the same list in every round of the run, each round once,
       the round within the study's rounds), trains as usual, and replies only the masked vector
       :func:`train_vector` ``[trained, n, loss weight, loss weight * loss, n * parameters...]`` under
       round id ``train-<server round>`` (``n`` = its train rows, 0 with a zero vector when the release
       rule withholds its update: the coordinator cannot tell which site that was).  Evaluation metrics of
       ``evaluate-received`` stay in clear beside it (released by the release rule as before).
    3. The coordinator adds the vectors (:func:`omopfl.secagg.unmask_sum`) and divides by the summed ``n``:
       exactly FedAvg's weighted mean (FedProx too: its proximal term is local).  FedAdam is refused with
       secure aggregation when the study is parsed.

Fixed point: :data:`FRAC_BITS` fractional bits, so each site's ``n * w`` carries an absolute rounding error
of at most ``2**-(FRAC_BITS+1)`` and the mean one of ``n_sites * 2**-(FRAC_BITS+1) / sum n`` (about 1e-10
for three sites of 100 rows).  A site whose ``|n * w|`` would leave the range (:func:`omopfl.secagg.max_abs_value`,
1.8e11 for three sites) refuses the round with ``secagg_refused``; nothing is clipped.

Dropout: no tolerance.  If a participant's masked vector does not arrive in a round, the round's sum is
lost: :func:`unmask_round` raises :class:`omopfl.federation.coordinator.training.RoundsFailed` naming the sites that
did not send and the run stops (the last checkpoint kept; resume starts a new run with a new key round).

What the coordinator learns per round: the summed update, the summed train rows, the number of sites that
trained, the summed loss; not any site's weights, rows, loss, nor which site withheld.  DP-SGD's epsilon is
not sent (it is in each site's audit log).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from omopfl import secagg
from omopfl.federation import codec
from omopfl.federation.coordinator import secure_statistics as secure_stats

__all__ = ["TRAIN_KEYS_PHASE", "TRAIN_RECORD", "FRAC_BITS", "LABEL", "Participants", "round_id", "train_vector",
           "encode_keys_request", "encode_train_request",
           "decode_train_request", "collect_keys", "attach", "unmask_round", "LANES"]

_log = logging.getLogger("flwr.omopfl")

TRAIN_KEYS_PHASE = "train-keys"
TRAIN_RECORD = "omopfl.secagg-train"
FRAC_BITS = secagg.DEFAULT_FRAC_BITS
LABEL = "weights"
LANES = 4
"""Lanes before the parameters: trained (0/1), n, loss weight, loss weight * loss."""


def round_id(server_round: int) -> str:
    return f"train-{int(server_round)}"


@dataclass(frozen=True)
class Participants:
    """The participant list of a run's training, as the sites published their keys (sorted by name)."""

    sites: tuple[str, ...]
    keys: tuple[str, ...]
    signatures: tuple[str, ...]
    nodes: tuple[int, ...] = ()


def encode_keys_request(study_hash: str) -> RecordDict:
    """The training key round's ``query.secagg`` request."""
    return RecordDict({"omopfl.secagg": ConfigRecord({"protocol": codec.PROTOCOL, "study-hash": study_hash,
                                                      "phase": TRAIN_KEYS_PHASE})})


def encode_train_request(participants: Participants) -> ConfigRecord:
    return ConfigRecord({"protocol": codec.PROTOCOL, "sites": list(participants.sites),
                         "keys": list(participants.keys), "signatures": list(participants.signatures)})


def decode_train_request(content: RecordDict) -> Participants:
    """The participant list a ``train`` message carries; :class:`codec.CodecError` if missing or malformed."""
    record = content.config_records.get(TRAIN_RECORD)
    if record is None:
        raise codec.CodecError(f"record {TRAIN_RECORD!r} is missing (the study asks for secure aggregation)")
    if set(record.keys()) != {"protocol", "sites", "keys", "signatures"} or record.get("protocol") != codec.PROTOCOL:
        raise codec.CodecError(f"record {TRAIN_RECORD!r}: needs protocol, sites, keys, signatures")
    sites, keys, signatures = record["sites"], record["keys"], record["signatures"]
    if (not all(isinstance(v, list) for v in (sites, keys, signatures))
            or not len(sites) == len(keys) == len(signatures)
            or not all(isinstance(v, str) for v in [*sites, *keys, *signatures])):
        raise codec.CodecError(f"record {TRAIN_RECORD!r}: sites, keys and signatures must be string lists of "
                               "one length")
    return Participants(tuple(sites), tuple(keys), tuple(signatures))


def flatten(arrays: ArrayRecord) -> np.ndarray:
    """The arrays of a state dict, in the record's order, as one float64 vector."""
    parts = [np.asarray(a.numpy(), dtype=np.float64).reshape(-1) for a in arrays.values()]
    return np.concatenate(parts) if parts else np.zeros(0)


def train_vector(reply: RecordDict, received: ArrayRecord) -> tuple[np.ndarray, int]:
    """``([trained, n, loss weight, loss weight * loss, n * parameters...], n)`` of a site's plain train reply.

    ``received`` fixes the layout (the coordinator's keys and shapes); a site that sent ``num-examples`` 0
    (the release rule withheld its update) gives a zero vector of the same length.
    """
    from omopfl.federation.codec import TRAIN_ARRAYS, TRAIN_METRICS, WEIGHT_KEY

    size = int(sum(int(np.prod(a.shape)) for a in received.values()))
    metrics = reply.metric_records.get(TRAIN_METRICS)
    n = int(metrics.get(WEIGHT_KEY, 0)) if metrics is not None else 0  # type: ignore[arg-type]
    if n <= 0:
        return np.zeros(LANES + size), 0
    arrays = reply.array_records[TRAIN_ARRAYS]
    if list(arrays.keys()) != list(received.keys()) or any(tuple(arrays[k].shape) != tuple(received[k].shape)
                                                           for k in received):
        raise secagg.SecAggError("the trained model's arrays differ from the received ones")
    loss = metrics.get("loss") if metrics is not None else None
    has_loss = isinstance(loss, int | float) and not isinstance(loss, bool) and np.isfinite(float(loss))
    lanes = [1.0, float(n), float(n) if has_loss else 0.0, float(n) * float(loss) if has_loss else 0.0]  # type: ignore[arg-type]
    return np.concatenate([lanes, float(n) * flatten(arrays)]), n


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
    :class:`omopfl.federation.coordinator.training.RoundsFailed` when a participant's vector is missing or the masks do
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
