"""Secure aggregation: masked sums the coordinator can add but not read one by one.

Each site of a round turns its float64 vector into fixed-point integers and adds pairwise masks mod 2^64
that cancel in the sum over all sites of the round.  The coordinator relays public keys, receives one masked
vector per site and calls :func:`unmask_sum`, which returns the sum (and refuses when the masks do not cancel).

Threat model
------------
* **Honest-but-curious coordinator.**  It relays messages faithfully but may read and keep everything it
  relays.  It sees each site's X25519 public key and masked vector; a masked vector is the plaintext plus a
  ChaCha20 keystream keyed by secrets the coordinator does not have, so on its own it is uniform mod 2^64 and
  tells the coordinator nothing; it learns only the sum.  Sites learn nothing from each other (they never
  see masked vectors).
* **Keys are bound** to the run id, both sites' names, both public keys and the participant list (HKDF
  ``info``), and each mask to a round id, a label and the vector length.  A key relayed under the wrong
  site, run or participant list gives masks that do not cancel, and :func:`unmask_sum` raises instead of
  returning a wrong sum (a check lane carries 1 from each site; it must sum to the number of sites).
* **An active coordinator** that substitutes its own public keys (man in the middle) could unmask single
  sites.  Against that, give each session an Ed25519 ``identity_key`` and pass the other sites' identity
  public keys (pinned out of band, e.g. in the approved study) as ``trusted``: unsigned or wrongly signed
  bundles are then refused.  Without pinned identity keys only the honest-but-curious model holds.
* **No dropout tolerance.**  Every listed site must send its masked vector for the same round id and label.
  If one drops, the round's sum is lost (:func:`unmask_sum` raises); run the round again with new sessions
  (new keys) for the sites that remain.  Sending masks of two different rounds under one key pair is safe
  (the round id is in the key derivation); masking two vectors under the same round id and label is refused
  (the difference of the two masked vectors would be the difference of the plaintexts).
* What the **sum** reveals is not this module's business: with two sites either site's value follows from
  the sum and the other's, so at least three sites are required; small counts inside a sum still need the
  release rule (``omopfl.release``) and DP (``omopfl.moment_noise``) at each site before masking.

Precision
---------
Values are rounded to ``frac_bits`` fractional bits (``round(x * 2**frac_bits)``; the scale is a power of
two, so scaling is exact).  Each value carries an absolute rounding error of at most ``2**-(frac_bits+1)``,
so the unmasked sum matches the exact sum of the inputs within ``n_sites * 2**-(frac_bits+1)`` (default
``frac_bits=24``: 3e-8 per site).  The integer sum is exact; its conversion back to float64 adds one float64
rounding (relative 1.1e-16).  Values larger than ``2**53 / 2**frac_bits`` are exact already.  Range: each
site's ``|x| * 2**frac_bits`` must be at most ``(2**63 - 1) // n_sites`` so the sum cannot wrap (default:
``|x| <= 1.8e11`` for three sites); larger values are refused with :class:`SecAggError`, never clipped.

Why written here and not taken from a library
---------------------------------------------
Evaluated in notes/secagg.md (2026-12): declearn 2.9.1 (Apache-2.0, masking and Joye-Libert) requires
``pandas<3.0`` and conflicts with omopfl's ``pandas==3.1.1``; its masks come from numpy's PCG64 (not a
cryptographic generator) and it clips out-of-range values silently.  Fed-BioMed 6.4.1 (Apache-2.0, LOM and
Joye-Libert) requires ``cryptography~=40.0`` (flwr 1.41 and 1.42 need ``>=50``), ``declearn<2.9`` and torchvision, and
its primitives import torch and its data directory.  Flower's SecAgg+ runs only in the legacy workflow and
seeds its masks with a 32-bit ``numpy.random.RandomState`` seed.  So the cryptography is the
``cryptography`` package's (X25519, HKDF-SHA256, ChaCha20, Ed25519; already installed as a dependency of
flwr) and the arithmetic is numpy ``uint64``; what is written here is only omopfl's own glue: which names and
ids are bound into the keys, the fixed-point encoding with its overflow check, the check lane and the
refusal to reuse a mask.  The construction is the pairwise masking of Bonawitz et al. (2017) without the
secret sharing that gives dropout tolerance, the same as declearn's masking and Fed-BioMed's LOM.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "DEFAULT_FRAC_BITS",
    "MIN_SITES",
    "MaskedVector",
    "PublicKeyBundle",
    "SecAggError",
    "SecAggSession",
    "max_abs_value",
    "merge_moment_sums",
    "moment_sums",
    "unmask_sum",
]

PROTOCOL = "omopfl-secagg-v1"
DEFAULT_FRAC_BITS = 24
MIN_SITES = 3
_INT63 = 2**63 - 1


class SecAggError(ValueError):
    """A secure-aggregation step was refused (bad keys, overflow, reuse, masks that do not cancel)."""


def _field(*parts: str | bytes | int) -> bytes:
    """Length-prefixed concatenation, so that no two different tuples encode to the same bytes."""
    out = bytearray()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p.to_bytes(8, "big") if isinstance(p, int) else bytes(p)
        out += len(b).to_bytes(4, "big") + b
    return bytes(out)


def _sites(sites: Iterable[str]) -> tuple[str, ...]:
    names = tuple(sorted(sites))
    if len(set(names)) != len(names) or not all(isinstance(s, str) and s for s in names):
        raise SecAggError(f"site names must be unique non-empty strings: {names}")
    if len(names) < MIN_SITES:
        raise SecAggError(
            f"secure aggregation needs at least {MIN_SITES} sites ({len(names)} given): with two, each site "
            "learns the other's value from the sum"
        )
    return names


def _sites_digest(sites: tuple[str, ...]) -> str:
    return hashlib.sha256(_field(*sites)).hexdigest()


def max_abs_value(n_sites: int, frac_bits: int = DEFAULT_FRAC_BITS) -> float:
    """Largest ``|x|`` a site may mask so that the fixed-point sum over ``n_sites`` cannot overflow."""
    return (_INT63 // n_sites) / 2.0**frac_bits


def _check_frac_bits(frac_bits: int) -> int:
    if not isinstance(frac_bits, int) or isinstance(frac_bits, bool) or not 0 <= frac_bits <= 52:
        raise SecAggError(f"frac_bits must be an integer in 0..52, got {frac_bits!r}")
    return frac_bits


@dataclass(frozen=True)
class PublicKeyBundle:
    """What a site publishes (through the coordinator): its X25519 key, bound to its name and the run."""

    site: str
    run_id: str
    public_key: bytes
    signature: bytes | None = None

    def signed_bytes(self) -> bytes:
        return _field(PROTOCOL, "key", self.run_id, self.site, self.public_key)

    def to_dict(self) -> dict[str, str]:
        out = {"site": self.site, "run_id": self.run_id, "public_key": self.public_key.hex()}
        if self.signature is not None:
            out["signature"] = self.signature.hex()
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PublicKeyBundle:
        try:
            sig = d.get("signature")
            return cls(str(d["site"]), str(d["run_id"]), bytes.fromhex(d["public_key"]),
                       bytes.fromhex(sig) if sig else None)
        except (KeyError, TypeError, ValueError) as exc:
            raise SecAggError(f"malformed public key bundle: {exc}") from exc


@dataclass(frozen=True)
class MaskedVector:
    """One site's masked vector for one round and label (``data``: uint64, the values then the check lane)."""

    site: str
    run_id: str
    round_id: str
    label: str
    sites_digest: str
    n_sites: int
    frac_bits: int
    data: np.ndarray = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (``data`` as little-endian bytes), e.g. for a ConfigRecord."""
        return {
            "site": self.site, "run_id": self.run_id, "round_id": self.round_id, "label": self.label,
            "sites_digest": self.sites_digest, "n_sites": self.n_sites, "frac_bits": self.frac_bits,
            "data": self.data.astype("<u8").tobytes(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MaskedVector:
        try:
            raw = d["data"]
            if len(raw) % 8 or len(raw) < 8:
                raise ValueError("data is not a whole number of uint64 values")
            data = np.frombuffer(bytes(raw), dtype="<u8").astype(np.uint64)
            return cls(str(d["site"]), str(d["run_id"]), str(d["round_id"]), str(d["label"]),
                       str(d["sites_digest"]), int(d["n_sites"]), int(d["frac_bits"]), data)
        except (KeyError, TypeError, ValueError) as exc:
            raise SecAggError(f"malformed masked vector: {exc}") from exc


def _keystream(key: bytes, n_values: int) -> np.ndarray:
    """n_values uniform uint64 from ChaCha20 (the key is used for this one vector only, so a fixed nonce)."""
    enc = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None).encryptor()
    return np.frombuffer(enc.update(b"\x00" * (8 * n_values)) + enc.finalize(), dtype="<u8").astype(np.uint64)


class SecAggSession:
    """One site's side of secure aggregation for one run: a fresh X25519 key pair and the peers' keys.

    Parameters
    ----------
    site:
        This site's name (as the coordinator and the other sites know it).
    sites:
        All sites of the run, this one included (at least three).  Every one must send a masked vector in
        each masked round, or that round's sum is lost.
    run_id:
        Identifies the run (e.g. study hash and run id); bound into every key.
    frac_bits:
        Fixed-point fractional bits (resolution ``2**-frac_bits``); all sites of a run must use the same.
    identity_key:
        Optional long-lived Ed25519 key of this site; signs :meth:`public_bundle` (see the threat model).
    private_key:
        This run's X25519 private key when it was made before the participants were known (a site
        publishes its key first and learns the participant list with the masking request); default a
        fresh one.
    """

    def __init__(self, site: str, sites: Iterable[str], run_id: str, *, frac_bits: int = DEFAULT_FRAC_BITS,
                 identity_key: Ed25519PrivateKey | None = None,
                 private_key: X25519PrivateKey | None = None) -> None:
        self.sites = _sites(sites)
        if site not in self.sites:
            raise SecAggError(f"site {site!r} is not one of the sites {self.sites}")
        if not isinstance(run_id, str) or not run_id:
            raise SecAggError("run_id must be a non-empty string")
        self.site = site
        self.run_id = run_id
        self.frac_bits = _check_frac_bits(frac_bits)
        self._digest = _sites_digest(self.sites)
        self._private = private_key if private_key is not None else X25519PrivateKey.generate()
        self._public = self._private.public_key().public_bytes(serialization.Encoding.Raw,
                                                                serialization.PublicFormat.Raw)
        self._identity = identity_key
        self._pair_keys: dict[str, bytes] | None = None
        self._used: set[tuple[str, str]] = set()

    @property
    def max_abs(self) -> float:
        """Largest ``|x|`` this session masks (larger values raise :class:`SecAggError`)."""
        return max_abs_value(len(self.sites), self.frac_bits)

    def public_bundle(self) -> PublicKeyBundle:
        """This site's public key, bound to its name and the run (signed if an identity key was given)."""
        bundle = PublicKeyBundle(self.site, self.run_id, self._public)
        if self._identity is None:
            return bundle
        return PublicKeyBundle(self.site, self.run_id, self._public, self._identity.sign(bundle.signed_bytes()))

    def set_peer_keys(self, bundles: Iterable[PublicKeyBundle | Mapping[str, Any]], *,
                      trusted: Mapping[str, Ed25519PublicKey] | None = None) -> None:
        """Take the other sites' bundles (as relayed by the coordinator) and derive one secret per pair.

        Refused: a bundle of another run, of a site not in ``sites`` or twice the same site, a missing site,
        this site's own key under another name, and (when ``trusted`` maps site names to pinned Ed25519
        identity keys) a bundle without a valid signature by its site's key.
        """
        if self._pair_keys is not None:
            raise SecAggError("peer keys are already set for this session; make a new session for a new key set")
        got: dict[str, PublicKeyBundle] = {}
        for b in bundles:
            bundle = b if isinstance(b, PublicKeyBundle) else PublicKeyBundle.from_dict(b)
            if bundle.run_id != self.run_id:
                raise SecAggError(f"key of {bundle.site!r} is for run {bundle.run_id!r}, not {self.run_id!r}")
            if bundle.site == self.site:
                if bundle.public_key != self._public:
                    raise SecAggError(f"a key relayed as this site's ({self.site!r}) is not this site's key")
                continue
            if bundle.site not in self.sites:
                raise SecAggError(f"key of unknown site {bundle.site!r} (sites: {self.sites})")
            if bundle.site in got:
                raise SecAggError(f"two keys relayed for site {bundle.site!r}")
            if len(bundle.public_key) != 32 or bundle.public_key == self._public:
                raise SecAggError(f"key of {bundle.site!r} is not a fresh X25519 public key")
            if trusted is not None:
                ident = trusted.get(bundle.site)
                if ident is None or bundle.signature is None:
                    raise SecAggError(f"key of {bundle.site!r} is not signed by a trusted identity key")
                try:
                    ident.verify(bundle.signature, bundle.signed_bytes())
                except InvalidSignature as exc:
                    raise SecAggError(f"key of {bundle.site!r}: bad signature") from exc
            got[bundle.site] = bundle
        missing = [s for s in self.sites if s != self.site and s not in got]
        if missing:
            raise SecAggError(f"no key for sites {missing}")
        if len({b.public_key for b in got.values()}) != len(got):
            raise SecAggError("the same public key was relayed for two sites")
        keys: dict[str, bytes] = {}
        for peer, bundle in got.items():
            try:
                shared = self._private.exchange(X25519PublicKey.from_public_bytes(bundle.public_key))
            except ValueError as exc:
                raise SecAggError(f"key of {peer!r} is not a valid X25519 key: {exc}") from exc
            (lo, lo_key), (hi, hi_key) = sorted([(self.site, self._public), (peer, bundle.public_key)])
            info = _field(PROTOCOL, "pair", self.run_id, self._digest, lo, lo_key, hi, hi_key)
            keys[peer] = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)
        self._pair_keys = keys

    def mask(self, values: Sequence[float] | np.ndarray, round_id: str, label: str = "") -> MaskedVector:
        """Fixed-point encode ``values`` (1-D float64) and add this site's masks for ``(round_id, label)``.

        Raises :class:`SecAggError` for non-finite values, values beyond :attr:`max_abs`, a second mask for the
        same ``(round_id, label)``, or when :meth:`set_peer_keys` has not been called.
        """
        if self._pair_keys is None:
            raise SecAggError("set_peer_keys first")
        if (round_id, label) in self._used:
            raise SecAggError(f"round {round_id!r} label {label!r} was already masked by this session "
                              "(a second vector under the same masks would reveal the difference)")
        x = np.asarray(values, dtype=np.float64)
        if x.ndim != 1:
            raise SecAggError(f"mask takes a 1-D vector, got shape {x.shape}")
        q = _quantize(x, len(self.sites), self.frac_bits)
        n = q.size + 1
        plain = np.empty(n, dtype=np.uint64)
        plain[:-1] = q.view(np.uint64)
        plain[-1] = 1  # the check lane: sums to the number of sites when all masks cancel
        total = plain
        for peer, key in self._pair_keys.items():
            vkey = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                        info=_field(PROTOCOL, "mask", round_id, label, n)).derive(key)
            stream = _keystream(vkey, n)
            total = total + stream if self.site < peer else total - stream  # uint64 arrays wrap mod 2^64
        self._used.add((round_id, label))
        return MaskedVector(self.site, self.run_id, round_id, label, self._digest, len(self.sites),
                            self.frac_bits, total)


def _quantize(x: np.ndarray, n_sites: int, frac_bits: int) -> np.ndarray:
    if not np.all(np.isfinite(x)):
        bad = np.flatnonzero(~np.isfinite(x))
        raise SecAggError(f"values must be finite (not at positions {bad[:10].tolist()})")
    bound = _INT63 // n_sites
    limit = float(bound)
    if int(limit) > bound:  # float(bound) rounded up: step below it
        limit = float(np.nextafter(limit, 0.0))
    scaled = np.rint(x * 2.0**frac_bits)
    over = np.abs(scaled) > limit
    if np.any(over):
        i = int(np.flatnonzero(over)[0])
        raise SecAggError(
            f"value {x[i]!r} at position {i} is out of the fixed-point range: |x| must be at most "
            f"{limit / 2.0**frac_bits:.6g} for {n_sites} sites with frac_bits={frac_bits} "
            f"({int(over.sum())} values over); scale the values or lower frac_bits"
        )
    return scaled.astype(np.int64)


def unmask_sum(masked_vectors: Iterable[MaskedVector | Mapping[str, Any]]) -> np.ndarray:
    """Coordinator side: add one masked vector per site and return the float64 sum of the sites' values.

    Raises :class:`SecAggError` if the vectors are of different runs, rounds, labels, participant lists,
    lengths or scales, if a site is missing or repeated, or if the masks do not cancel (the check lane does
    not sum to the number of sites: keys relayed wrongly, a vector altered or from another round).
    """
    vs = [v if isinstance(v, MaskedVector) else MaskedVector.from_dict(v) for v in masked_vectors]
    if not vs:
        raise SecAggError("no masked vectors")
    first = vs[0]
    for v in vs:
        for attr in ("run_id", "round_id", "label", "sites_digest", "n_sites", "frac_bits"):
            if getattr(v, attr) != getattr(first, attr):
                raise SecAggError(f"masked vectors differ in {attr}: {getattr(v, attr)!r} vs "
                                  f"{getattr(first, attr)!r}")
        if v.data.shape != first.data.shape or v.data.dtype != np.uint64:
            raise SecAggError("masked vectors differ in length or are not uint64")
    names = [v.site for v in vs]
    if len(set(names)) != len(names):
        raise SecAggError(f"a site sent two masked vectors: {sorted(names)}")
    if len(vs) != first.n_sites:
        raise SecAggError(f"{len(vs)} masked vectors for {first.n_sites} sites: the sum of this round is lost "
                          "(no dropout tolerance; run the round again with the sites that remain)")
    total = np.sum(np.stack([v.data for v in vs]), axis=0, dtype=np.uint64)
    if int(total[-1]) != first.n_sites:
        raise SecAggError("masks do not cancel: a key was relayed wrongly, a vector was altered, or the vectors "
                          "are of different rounds")
    return total[:-1].view(np.int64).astype(np.float64) / 2.0**first.frac_bits


def moment_sums(x: np.ndarray, centre: Sequence[float] | np.ndarray) -> np.ndarray:
    """A site's summable moments of ``x`` (rows persons, columns features, NaN missing) around a public centre.

    Returns ``[n..., S1..., S2...]`` (length ``3k``): per feature the count of non-missing values,
    ``sum(x - c)`` and ``sum((x - c)**2)``.  Sums of these over sites give the pooled moments
    (:func:`merge_moment_sums`); a centre near the pooled mean keeps ``S1`` small and ``S2`` accurate.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    c = np.asarray(centre, dtype=np.float64).reshape(-1)
    if c.size != x.shape[1]:
        raise SecAggError(f"centre has {c.size} values for {x.shape[1]} features")
    present = ~np.isnan(x)
    d = np.where(present, x - c, 0.0)
    return np.concatenate([present.sum(axis=0).astype(np.float64), d.sum(axis=0), (d * d).sum(axis=0)])


def merge_moment_sums(total: np.ndarray, centre: Sequence[float] | np.ndarray) -> tuple[np.ndarray, ...]:
    """From summed :func:`moment_sums` to ``(n, mean, m2)`` per feature (``m2``: sum of squared deviations)."""
    t = np.asarray(total, dtype=np.float64)
    c = np.asarray(centre, dtype=np.float64).reshape(-1)
    k = c.size
    if t.size != 3 * k:
        raise SecAggError(f"expected {3 * k} summed values for {k} features, got {t.size}")
    n = np.rint(t[:k]).astype(np.int64)
    s1, s2 = t[k:2 * k], t[2 * k:]
    nf = n.astype(np.float64)
    pos = n > 0
    mean = np.where(pos, c + np.divide(s1, nf, out=np.zeros(k), where=pos), 0.0)
    m2 = np.where(pos, np.maximum(s2 - np.divide(s1 * s1, nf, out=np.zeros(k), where=pos), 0.0), 0.0)
    return n, mean, m2
