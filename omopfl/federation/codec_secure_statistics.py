"""Secure aggregation of the statistics phase, on the wire: the coordinator sees only sums of the sites' moments.

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

This module is the protocol's wire format and the vectors both sides compute; the coordinator's side is
:mod:`omopfl.federation.coordinator.secure_statistics`, the site's :mod:`omopfl.federation.site.app`.
Imports: Flower's records, numpy, :mod:`omopfl.secagg` (pure).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from omopfl import secagg
from omopfl.federation import codec

__all__ = ["SECAGG_QUERY", "FRAC_BITS", "SecAggRequest", "encode_keys_request", "encode_mask_request", "decode_request",
           "encode_keys_reply", "encode_masked_reply", "decode_reply", "round1_vector", "round2_vector"]


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
