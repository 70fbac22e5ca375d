"""Secure aggregation of training weights, on the wire: the coordinator sees only the sums of the sites' updates.

Used when the approved study says ``[privacy] secure_aggregation = true`` (the statistics phase is then
masked too, :mod:`omopfl.federation.coordinator.secure_statistics`).  Same construction
(:mod:`omopfl.secagg`: X25519 pair keys, ChaCha20 masks mod 2^64, optional pinned Ed25519 participants),
the same site trust boundary (:func:`omopfl.federation.site.secure.secagg_train`).

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
lost: :func:`omopfl.federation.coordinator.secure_rounds.unmask_round` raises
:class:`omopfl.errors.RoundsFailed` naming the sites that did not send and the run stops (the last
checkpoint kept; resume starts a new run with a new key round).

What the coordinator learns per round: the summed update, the summed train rows, the number of sites that
trained, the summed loss; not any site's weights, rows, loss, nor which site withheld.  DP-SGD's epsilon is
not sent (it is in each site's audit log).

This module is the wire format and the vector both sides use; the coordinator's side is
:mod:`omopfl.federation.coordinator.secure_rounds`, the site's :mod:`omopfl.federation.site.app`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from omopfl import secagg
from omopfl.federation import codec

__all__ = ["TRAIN_KEYS_PHASE", "TRAIN_RECORD", "FRAC_BITS", "LABEL", "LANES", "round_id", "Participants",
           "encode_keys_request", "encode_train_request", "decode_train_request", "flatten", "train_vector"]


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
