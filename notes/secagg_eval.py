"""Evaluation of maintained secure-aggregation primitives (issue 12): sum of 3 clients' float vectors.

Runs only in the throwaway venv /tmp/secagg-venv (declearn 2.9.1 and fedbiomed 6.4.1 installed there
with --no-deps; see notes/secagg.md).  Not part of omopfl.
"""

import secrets
import time

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

rng = np.random.default_rng(0)
N_SITES, DIM = 3, 1000
xs = [rng.normal(0, 1, DIM) * 10 ** rng.uniform(-3, 3, DIM) for _ in range(N_SITES)]
plain = np.sum(xs, axis=0)


def report(name, fed, seconds, extra=""):
    err = np.abs(fed - plain)
    rel = err / np.maximum(np.abs(plain), 1e-300)
    print(f"{name}: max abs err {err.max():.3g}, max rel err {rel.max():.3g}, {seconds:.3f} s {extra}")


def x25519_secrets(n):
    keys = [X25519PrivateKey.generate() for _ in range(n)]
    out = {}
    for i in range(n):
        for j in range(n):
            if i != j:
                shared = keys[i].exchange(keys[j].public_key())
                out[i, j] = HKDF(hashes.SHA256(), 32, None, b"eval").derive(shared)
    return out


# --- declearn 2.9.1: masking (Bonawitz et al. without dropout), PCG64 masks seeded by pair secrets -----
from declearn.secagg.masking import MaskingDecrypter, MaskingEncrypter  # noqa: E402

pair = x25519_secrets(N_SITES)
t = time.perf_counter()
enc = []
for i in range(N_SITES):
    pos, neg = [], []
    for j in range(N_SITES):
        if j != i:
            seed = int.from_bytes(pair[i, j], "big")
            (pos if i < j else neg).append(seed)
    e = MaskingEncrypter(pos_masks_seeds=pos, neg_masks_seeds=neg, bitsize=64, clipval=1e5)
    enc.append(e.encrypt_numpy_array(xs[i]))
dec = MaskingDecrypter(n_peers=N_SITES, bitsize=64, clipval=1e5)
summed = [dec.sum_encrypted(list(v)) for v in zip(*(c for c, _ in enc), strict=True)]
fed = dec.decrypt_numpy_array(summed, enc[0][1])
report("declearn masking (bitsize 64, clipval 1e5)", fed, time.perf_counter() - t)
q = enc[0][0]
print("  one masked vector: corr with plaintext", round(float(np.corrcoef(np.array(q, dtype=float), xs[0])[0, 1]), 4))
# silent clipping: a value above clipval comes back clipped, no error
e = MaskingEncrypter(pos_masks_seeds=[1], neg_masks_seeds=[], bitsize=64, clipval=1e5)
d = MaskingEncrypter(pos_masks_seeds=[], neg_masks_seeds=[1], bitsize=64, clipval=1e5)
a, spec = e.encrypt_numpy_array(np.array([3e5]))
b, _ = d.encrypt_numpy_array(np.array([0.0]))
dd = MaskingDecrypter(n_peers=2, bitsize=64, clipval=1e5)
print("  3e5 + 0 with clipval 1e5 ->", dd.decrypt_numpy_array([dd.sum_encrypted([a[0], b[0]])], spec), "(no error)")

# --- declearn 2.9.1: Joye-Libert (additive homomorphic, 1023-bit default biprime) --------------------
from declearn.secagg.joye_libert import JoyeLibertDecrypter, JoyeLibertEncrypter  # noqa: E402
from declearn.secagg.joye_libert._primitives import DEFAULT_BIPRIME  # noqa: E402

small = [x[:50] for x in xs]
prv = [secrets.randbits(2 * DEFAULT_BIPRIME.bit_length()) for _ in range(N_SITES)]
t = time.perf_counter()
encs = [JoyeLibertEncrypter(prv_key=k, bitsize=64, clipval=1e5) for k in prv]
cts = [e.encrypt_numpy_array(v) for e, v in zip(encs, small, strict=True)]
t_enc = time.perf_counter() - t
jdec = JoyeLibertDecrypter(pub_key=-sum(prv), n_peers=N_SITES, bitsize=64, clipval=1e5)
summed = [jdec.sum_encrypted(list(v)) for v in zip(*(c for c, _ in cts), strict=True)]
fed = jdec.decrypt_numpy_array(summed, cts[0][1])
el = time.perf_counter() - t
err = np.abs(fed - np.sum(small, axis=0)).max()
print(f"declearn Joye-Libert: 3 x 50 values, max abs err {err:.3g}, {el:.2f} s "
      f"({1000 * t_enc / (N_SITES * 50):.1f} ms per value encrypted); "
      f"ciphertext {2 * DEFAULT_BIPRIME.bit_length()} bits per value")

# --- fedbiomed 6.4.1: LOM (ChaCha20 PRF masks mod 2^64, ECDH P-256 pair secrets) -------------------
from fedbiomed.common.constants import SAParameters  # noqa: E402
from fedbiomed.common.secagg import SecaggLomCrypter  # noqa: E402
from fedbiomed.common.secagg._dh import DHKey, DHKeyAgreement  # noqa: E402

ids = [f"node{i}" for i in range(N_SITES)]
dh = {i: DHKey() for i in ids}
pw = {i: {j: DHKeyAgreement(i, dh[i], b"secagg-1").agree(j, dh[j].export_public_key()) for j in ids if j != i}
      for i in ids}
for clip, target, label in [(SAParameters.CLIPPING_RANGE, SAParameters.TARGET_RANGE, "training defaults"),
                            (SAParameters.FA_CLIPPING_RANGE, SAParameters.FA_TARGET_RANGE, "analytics defaults")]:
    t = time.perf_counter()
    crypter = SecaggLomCrypter(nonce="round-1")
    masked = [crypter.encrypt(current_round=1, node_id=i, params=[float(v) for v in x], pairwise_secrets=pw[i],
                              node_ids=ids, clipping_range=clip, target_range=target)
              for i, x in zip(ids, xs, strict=True)]
    mean = np.array(crypter.aggregate(masked, total_sample_size=N_SITES, clipping_range=clip, target_range=target))
    fed = mean * N_SITES
    inside = np.all(np.abs(np.array(xs)) <= clip, axis=0)
    err = np.abs(fed - plain)[inside]
    print(f"fedbiomed LOM ({label}: clip {clip:g}, target 2^{int(np.log2(target))}): "
          f"max abs err on unclipped {err.max():.3g}, {(~inside).sum()} of {DIM} clipped (warning only), "
          f"{time.perf_counter() - t:.3f} s")
