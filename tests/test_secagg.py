"""Secure aggregation (omopfl.secagg): masked sums equal plain sums; single vectors reveal nothing obvious."""

import dataclasses

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from omopfl import moments
from omopfl.secagg import (
    DEFAULT_FRAC_BITS,
    MaskedVector,
    PublicKeyBundle,
    SecAggError,
    SecAggSession,
    max_abs_value,
    merge_moment_sums,
    moment_sums,
    unmask_sum,
)

RUN = "study-abc/run-1"


def _sessions(n, run=RUN, **kw):
    sites = [f"site{i}" for i in range(n)]
    sessions = [SecAggSession(s, sites, run, **kw) for s in sites]
    bundles = [s.public_bundle().to_dict() for s in sessions]  # relayed by the coordinator as plain dicts
    for s in sessions:
        s.set_peer_keys(bundles)
    return sessions


def _relay(masked):
    """What the coordinator receives: plain dicts (bytes for the data)."""
    return [m.to_dict() for m in masked]


@pytest.mark.parametrize("n_sites", [3, 4, 5])
def test_masked_sum_equals_plain_sum(n_sites):
    rng = np.random.default_rng(n_sites)
    sessions = _sessions(n_sites)
    xs = [rng.normal(0, 1, 500) * 10.0 ** rng.uniform(-4, 6, 500) for _ in sessions]
    fed = unmask_sum(_relay(s.mask(x, "round-1") for s, x in zip(sessions, xs, strict=True)))
    exact = np.sum(xs, axis=0)
    assert np.max(np.abs(fed - exact)) <= n_sites * 2.0 ** -(DEFAULT_FRAC_BITS + 1) + 1e-16 * np.abs(exact).max()
    # integers (counts) come back exactly
    counts = [rng.integers(0, 10_000, 50).astype(float) for _ in sessions]
    fed = unmask_sum(s.mask(c, "round-1", "counts") for s, c in zip(sessions, counts, strict=True))
    assert np.array_equal(fed, np.sum(counts, axis=0))


def test_several_rounds_with_one_key_set_and_finer_scale():
    sessions = _sessions(3, frac_bits=40)
    rng = np.random.default_rng(7)
    for r in range(3):
        xs = [rng.normal(size=20) for _ in sessions]
        fed = unmask_sum(s.mask(x, f"round-{r}") for s, x in zip(sessions, xs, strict=True))
        assert np.max(np.abs(fed - np.sum(xs, axis=0))) <= 3 * 2.0**-41 + 1e-15


def test_one_masked_vector_reveals_nothing_obvious():
    sessions = _sessions(3)
    n = 4000
    plain = np.linspace(-1000, 1000, n)  # strongly structured plaintext
    masked = sessions[0].mask(plain, "round-1").data[:-1]
    as_unit = masked.astype(np.float64) / 2.0**64
    assert abs(np.corrcoef(as_unit, plain)[0, 1]) < 0.1
    # top 4 bits uniform (chi-square with 15 dof; 40 is far beyond the 99.9% quantile 37.7)
    counts = np.bincount((masked >> np.uint64(60)).astype(np.int64), minlength=16)
    chi2 = float(np.sum((counts - n / 16) ** 2 / (n / 16)))
    assert chi2 < 40
    assert 0.45 < as_unit.mean() < 0.55
    # the same plaintext in another round, or at another site, gives unrelated masked values
    other = sessions[0].mask(plain, "round-2").data[:-1]
    assert abs(np.corrcoef(as_unit, other.astype(np.float64))[0, 1]) < 0.1
    zeros = sessions[1].mask(np.zeros(n), "round-1").data[:-1]
    assert len(np.unique(zeros)) == n


def test_mask_reuse_refused():
    s = _sessions(3)[0]
    s.mask([1.0, 2.0], "round-1", "weights")
    with pytest.raises(SecAggError, match="already masked"):
        s.mask([3.0, 4.0], "round-1", "weights")
    s.mask([3.0, 4.0], "round-1", "moments")  # another label is another mask


def test_swapped_or_foreign_keys_give_a_detected_wrong_sum():
    sites = ["a", "b", "c"]
    sessions = {s: SecAggSession(s, sites, RUN) for s in sites}
    bundles = {s: v.public_bundle() for s, v in sessions.items()}
    # the coordinator tells site a that b's key is c's and c's key is b's (names swapped, keys kept)
    swapped = [bundles["a"], dataclasses.replace(bundles["b"], site="c"), dataclasses.replace(bundles["c"], site="b")]
    sessions["a"].set_peer_keys(swapped)
    sessions["b"].set_peer_keys(bundles.values())
    sessions["c"].set_peer_keys(bundles.values())
    xs = {s: np.ones(10) for s in sites}
    with pytest.raises(SecAggError, match="masks do not cancel"):
        unmask_sum(sessions[s].mask(xs[s], "r") for s in sites)

    # a key of the coordinator's own in place of c's (for b only)
    sessions = {s: SecAggSession(s, sites, RUN) for s in sites}
    bundles = {s: v.public_bundle() for s, v in sessions.items()}
    intruder = SecAggSession("c", sites, RUN).public_bundle()
    sessions["a"].set_peer_keys(bundles.values())
    sessions["b"].set_peer_keys([bundles["a"], intruder])
    sessions["c"].set_peer_keys(bundles.values())
    with pytest.raises(SecAggError, match="masks do not cancel"):
        unmask_sum(sessions[s].mask(xs[s], "r") for s in sites)


def test_vectors_of_another_round_or_a_relabelled_round_are_refused():
    sessions = _sessions(3)
    vs = [s.mask([1.0, 2.0], "r1") for s in sessions[:2]] + [sessions[2].mask([1.0, 2.0], "r2")]
    with pytest.raises(SecAggError, match="round_id"):
        unmask_sum(vs)
    sessions = _sessions(3)
    vs = [s.mask([1.0, 2.0], "r1") for s in sessions[:2]] + [sessions[2].mask([1.0, 2.0], "r2")]
    vs[2] = dataclasses.replace(vs[2], round_id="r1")
    with pytest.raises(SecAggError, match="masks do not cancel"):
        unmask_sum(vs)


def test_dropped_site_loses_the_round():
    sessions = _sessions(4)
    vs = [s.mask([1.0, 2.0], "r1") for s in sessions[:3]]
    with pytest.raises(SecAggError, match="lost"):
        unmask_sum(vs)
    with pytest.raises(SecAggError, match="two masked vectors"):
        unmask_sum([*vs, vs[0]])


def test_key_bundles_bound_to_run_and_sites():
    sites = ["a", "b", "c"]
    a, b, c = (SecAggSession(s, sites, RUN) for s in sites)
    other_run = SecAggSession("c", sites, "another-run").public_bundle()
    with pytest.raises(SecAggError, match="for run"):
        a.set_peer_keys([b.public_bundle(), other_run])
    with pytest.raises(SecAggError, match="no key for sites"):
        a.set_peer_keys([b.public_bundle()])
    with pytest.raises(SecAggError, match="unknown site"):
        a.set_peer_keys([b.public_bundle(), c.public_bundle(), SecAggSession("d", [*sites, "d"], RUN).public_bundle()])
    with pytest.raises(SecAggError, match="this site's"):
        a.set_peer_keys([dataclasses.replace(b.public_bundle(), site="a"), c.public_bundle()])
    with pytest.raises(SecAggError, match="same public key"):
        a.set_peer_keys([b.public_bundle(), dataclasses.replace(b.public_bundle(), site="c")])
    with pytest.raises(SecAggError, match="at least 3 sites"):
        SecAggSession("a", ["a", "b"], RUN)
    with pytest.raises(SecAggError, match="set_peer_keys first"):
        SecAggSession("a", sites, RUN).mask([1.0], "r")


def test_signed_bundles_with_pinned_identity_keys():
    sites = ["a", "b", "c"]
    ids = {s: Ed25519PrivateKey.generate() for s in sites}
    trusted = {s: k.public_key() for s, k in ids.items()}
    sessions = {s: SecAggSession(s, sites, RUN, identity_key=ids[s]) for s in sites}
    bundles = [v.public_bundle().to_dict() for v in sessions.values()]
    for v in sessions.values():
        v.set_peer_keys(bundles, trusted=trusted)
    fed = unmask_sum(sessions[s].mask([float(i)], "r") for i, s in enumerate(sites))
    assert fed.tolist() == [3.0]
    # the coordinator substitutes its own key for c's: unsigned, or signed with a key that is not c's
    fresh = SecAggSession("a", sites, RUN)
    forged = SecAggSession("c", sites, RUN, identity_key=Ed25519PrivateKey.generate()).public_bundle()
    good = {b["site"]: b for b in bundles}
    with pytest.raises(SecAggError, match="bad signature"):
        fresh.set_peer_keys([good["b"], forged.to_dict()], trusted=trusted)
    fresh = SecAggSession("a", sites, RUN)
    unsigned = SecAggSession("c", sites, RUN).public_bundle()
    with pytest.raises(SecAggError, match="not signed"):
        fresh.set_peer_keys([good["b"], unsigned], trusted=trusted)
    assert PublicKeyBundle.from_dict(good["b"]).signature is not None


def test_overflow_and_non_finite_refused():
    sessions = _sessions(3)
    limit = sessions[0].max_abs
    assert limit == max_abs_value(3)
    with pytest.raises(SecAggError, match="out of the fixed-point range"):
        sessions[0].mask([0.0, limit * 1.001], "r")
    with pytest.raises(SecAggError, match="finite"):
        sessions[0].mask([np.nan], "r2")
    # at the limit every site may send the extreme value without the sum wrapping
    fed = unmask_sum(s.mask([limit, -limit], "r3") for s in sessions)
    assert np.allclose(fed, [3 * limit, -3 * limit], rtol=1e-15)


def test_malformed_records_refused():
    s = _sessions(3)[0]
    d = s.mask([1.0], "r").to_dict()
    with pytest.raises(SecAggError, match="malformed"):
        MaskedVector.from_dict({**d, "data": b"\x00" * 7})
    with pytest.raises(SecAggError, match="malformed"):
        PublicKeyBundle.from_dict({"site": "a"})


def test_moments_aggregate_to_chan_merge():
    rng = np.random.default_rng(3)
    names = ["age", "bmi", "statins"]
    data = []
    for size in (40, 75, 120, 60):
        x = np.column_stack([rng.normal(60, 12, size), rng.normal(27, 4, size), rng.poisson(3, size).astype(float)])
        x[rng.random(x.shape) < 0.1] = np.nan
        data.append(x)
    centre = np.array([55.0, 25.0, 2.0])  # public (e.g. from the study), not the data's means
    sessions = _sessions(len(data))
    fed = unmask_sum(s.mask(moment_sums(x, centre), "stats") for s, x in zip(sessions, data, strict=True))
    n, mean, m2 = merge_moment_sums(fed, centre)
    chan = moments.merge_all(moments.Moments.from_array(x, names) for x in data)
    assert np.array_equal(n, chan.n)
    np.testing.assert_allclose(mean, chan.mean, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(m2, chan.m2, rtol=1e-9)
    pooled = np.vstack(data)
    np.testing.assert_allclose(mean, np.nanmean(pooled, axis=0), rtol=1e-10)
    np.testing.assert_allclose(m2, np.nansum((pooled - np.nanmean(pooled, axis=0)) ** 2, axis=0), rtol=1e-9)
