"""omopfl.moments, omopfl.suppression, omopfl.moment_noise.

Chan merge against pooled numpy, scaler, disclosure control, DP noise, purity.
"""

from __future__ import annotations

import ast
import functools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import omopfl.moment_noise
import omopfl.moments
import omopfl.suppression
from omopfl.moment_noise import dp_noise_scales, gaussian_sigma, noisy_moments, noisy_sums
from omopfl.moments import Moments, Scaler, finalize, merge, merge_all
from omopfl.suppression import Released, binary_columns, suppress

EPS = float(np.finfo(np.float64).eps)
EPOCH = 1.7e9  # dates as epoch seconds
DAY = 86_400.0

FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def naive_federated_variance(parts: list[np.ndarray]) -> float:
    """The foil: one-pass ``sum(x^2)/n - mean^2`` merged from (n, sum, sum of squares) per site.

    Kept only here, to show why omopfl never uses it.
    """
    n = sum(len(p) for p in parts)
    s = sum(float(p.sum()) for p in parts)
    q = sum(float((p * p).sum()) for p in parts)
    mean = s / n
    return (q / n - mean * mean) * n / (n - 1)


def pooled_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column: count, np.nanmean and np.nanstd(ddof=1) on the pooled data (NaN where undefined)."""
    count = (~np.isnan(x)).sum(axis=0)
    mean = np.full(x.shape[1], np.nan)
    std = np.full(x.shape[1], np.nan)
    for j in range(x.shape[1]):
        if count[j] >= 1:
            mean[j] = np.nanmean(x[:, j])
        if count[j] >= 2:
            std[j] = np.nanstd(x[:, j], ddof=1)
    return count, mean, std


def split_rows(x: np.ndarray, cuts: list[int]) -> list[np.ndarray]:
    return np.split(x, sorted(min(c, len(x)) for c in cuts))


# ------------------------------------------------------------------------------------------
# merge == pooled two-pass numpy
# ------------------------------------------------------------------------------------------

# (offset, spread) pairs with spread / |offset| >= 5e-4: the documented 1e-12 regime
REGIMES = [(0.0, 1e-3), (0.0, 1.0), (0.0, 1e4), (-5e3, 10.0), (1e6, 1e3), (EPOCH, 30 * DAY), (EPOCH, 365 * DAY)]


@st.composite
def datasets(draw: st.DrawFn) -> tuple[np.ndarray, list[int]]:
    rows = draw(st.integers(0, 80))
    features = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    columns = []
    for _ in range(features):
        offset, spread = draw(st.sampled_from(REGIMES))
        col = offset + spread * rng.standard_normal(rows)
        missing = draw(st.sampled_from([0.0, 0.0, 0.3, 0.9, 1.0]))
        col[rng.random(rows) < missing] = np.nan
        columns.append(col)
    x = np.column_stack(columns) if rows else np.empty((0, features))
    if draw(st.booleans()):  # sorted rows: sites with very different means, the hard case
        x = x[np.argsort(x[:, 0], kind="stable")]
    cuts = draw(st.lists(st.integers(0, rows), max_size=6))
    return x, cuts


@FAST
@given(datasets())
def test_merge_of_any_split_equals_pooled_numpy(data: tuple[np.ndarray, list[int]]) -> None:
    x, cuts = data
    names = [f"f{j}" for j in range(x.shape[1])]
    parts = split_rows(x, cuts)
    merged = merge_all(Moments.from_array(p, names) for p in parts)
    count, ref_mean, ref_std = pooled_reference(x)
    mean, std = finalize(merged, ddof=1)

    assert merged.persons == len(x)
    np.testing.assert_array_equal(merged.n, count)
    for j in range(x.shape[1]):
        if count[j] == 0:
            assert np.isnan(mean[j]) and np.isnan(std[j])
            assert merged.mean[j] == 0.0 and merged.m2[j] == 0.0
            continue
        scale = np.nanmax(np.abs(x[:, j]))
        assert abs(mean[j] - ref_mean[j]) <= 1e-12 * scale
        if count[j] == 1:
            assert np.isnan(std[j])
        else:
            assert abs(std[j] - ref_std[j]) <= 1e-12 * ref_std[j]

    # the merge order does not matter (to rounding): left fold over the reversed sites
    folded = functools.reduce(merge, reversed([Moments.from_array(p, names) for p in parts]), Moments.empty(names))
    np.testing.assert_array_equal(folded.n, merged.n)
    _, std2 = finalize(folded)
    np.testing.assert_allclose(std2, std, rtol=1e-12, equal_nan=True)


@FAST
@given(datasets(), datasets())
def test_merge_is_commutative_and_has_an_identity(a: tuple[np.ndarray, list[int]], b: Any) -> None:
    xa, xb = a[0][:, :1], b[0][:, :1]
    ma, mb = Moments.from_array(xa, ["f"]), Moments.from_array(xb, ["f"])
    assert merge(ma, Moments.empty(["f"])) == ma
    assert merge(Moments.empty(["f"]), ma) == ma
    ab, ba = merge(ma, mb), merge(mb, ma)
    np.testing.assert_array_equal(ab.n, ba.n)
    scale = max(abs(float(ab.mean[0])), 1.0)
    assert abs(ab.mean[0] - ba.mean[0]) <= 4 * EPS * scale
    np.testing.assert_allclose(ab.m2, ba.m2, rtol=1e-13, atol=0)


def test_documented_precision_bound_for_tiny_spreads_on_epoch_seconds() -> None:
    """Below the 1e-12 regime the error follows the documented ~2*eps*|mean|/std bound."""
    rng = np.random.default_rng(7)
    for spread in (60.0, 3600.0, DAY):
        for _ in range(30):
            x = np.sort(EPOCH + spread * rng.standard_normal(300))  # sorted: worst case
            parts = split_rows(x[:, None], sorted(rng.integers(0, 301, size=4).tolist()))
            _, std = finalize(merge_all(Moments.from_array(p, ["t"]) for p in parts))
            ref = np.std(x, ddof=1)
            bound = 4 * EPS * EPOCH / ref + 1e-14
            assert abs(std[0] - ref) / ref <= bound


def test_naive_one_pass_formula_fails_where_chan_passes() -> None:
    rng = np.random.default_rng(2024)
    # admission times over about a day, as epoch seconds, at three sites
    x = EPOCH + DAY * rng.standard_normal(3000)
    parts = np.split(x, [700, 2100])
    ref = np.std(x, ddof=1)
    _, chan_std = finalize(merge_all(Moments.from_array(p[:, None], ["t"]) for p in parts))
    chan_error = abs(chan_std[0] - ref) / ref
    naive_var = naive_federated_variance(parts)
    naive_error = abs(math.sqrt(naive_var) - ref) / ref if naive_var > 0 else math.inf
    assert chan_error < 1e-12
    assert naive_error > 1e-9, naive_error  # more than a thousand times the tolerance

    # a spread of a minute: the naive variance is off by percents or negative
    y = EPOCH + 60.0 * rng.standard_normal(1000)
    parts = np.split(y, [300, 600])
    ref = np.std(y, ddof=1)
    naive_var = naive_federated_variance(parts)
    assert naive_var <= 0 or abs(math.sqrt(naive_var) - ref) / ref > 1e-3
    _, chan_std = finalize(merge_all(Moments.from_array(p[:, None], ["t"]) for p in parts))
    assert abs(chan_std[0] - ref) / ref < 1e-8


def test_from_array_conventions() -> None:
    x = np.array([[1.0, np.nan, 5.0], [2.0, np.nan, np.nan], [3.0, np.nan, np.nan]])
    m = Moments.from_array(x, ["a", "b", "c"])
    np.testing.assert_array_equal(m.n, [3, 0, 1])
    np.testing.assert_array_equal(m.mean, [2.0, 0.0, 5.0])
    np.testing.assert_array_equal(m.m2, [2.0, 0.0, 0.0])
    assert m.persons == 3 and m.n.dtype == np.int64 and m.mean.dtype == np.float64
    mean, std = finalize(m)
    np.testing.assert_array_equal(mean, [2.0, np.nan, 5.0])
    np.testing.assert_array_equal(std, [1.0, np.nan, np.nan])
    _, std0 = finalize(m, ddof=0)
    np.testing.assert_array_equal(std0, [math.sqrt(2 / 3), np.nan, 0.0])
    with pytest.raises(ValueError):
        m.n[0] = 5  # read-only
    empty = Moments.from_array(np.empty((0, 2)), ["a", "b"])
    assert empty == Moments.empty(["a", "b"])


def test_from_array_accepts_dataframes_with_pd_na() -> None:
    df = pd.DataFrame({"age": pd.array([60, None, 70], dtype="Int64"), "bmi": [20.0, 30.0, np.nan]})
    m = Moments.from_array(df, ["age", "bmi"])
    np.testing.assert_array_equal(m.n, [2, 2])
    np.testing.assert_array_equal(m.mean, [65.0, 25.0])
    with pytest.raises(ValueError, match="only in first"):
        Moments.from_array(df, ["age", "weight"])


def test_invalid_inputs_raise_value_error_without_values() -> None:
    with pytest.raises(ValueError, match=r"infinite values: \['b'\]"):
        Moments.from_array(np.array([[1.0, np.inf]]), ["a", "b"])
    with pytest.raises(ValueError, match="duplicates"):
        Moments.empty(["a", "a"])
    with pytest.raises(ValueError, match="persons"):
        Moments.from_array(np.ones((5, 1)), ["a"], persons=3)
    with pytest.raises(ValueError, match="m2"):
        Moments([2], [1.0], [-1.0], ("a",), 2)
    with pytest.raises(ValueError, match="nothing"):
        merge_all([])
    assert merge_all([], feature_names=["a"]) == Moments.empty(["a"])


def test_merge_names_the_mismatch() -> None:
    a = Moments.empty(["age", "bmi"])
    with pytest.raises(ValueError, match=r"only in first \['bmi'\], only in second \['sbp'\]"):
        merge(a, Moments.empty(["age", "sbp"]))
    with pytest.raises(ValueError, match="different order"):
        merge(a, Moments.empty(["bmi", "age"]))


# ------------------------------------------------------------------------------------------
# scaler
# ------------------------------------------------------------------------------------------


def test_near_constant_features_get_scale_one() -> None:
    rng = np.random.default_rng(0)
    n = 200
    nudged = np.full(n, EPOCH)
    nudged[rng.random(n) < 0.5] = np.nextafter(EPOCH, np.inf)  # differs in the last bit only
    x = np.column_stack(
        [
            np.full(n, 0.1),  # constant, not exactly representable
            nudged,
            EPOCH + DAY * rng.standard_normal(n),  # real spread at a large offset
            1e-10 * rng.standard_normal(n),  # tiny but real variance around zero
            np.full(n, np.nan),  # no data ...
        ]
    )
    x[0, 4] = 3.0  # ... except one value: n == 1 <= ddof
    names = ["const", "nudged", "date", "tiny", "single"]
    merged = merge_all(Moments.from_array(p, names) for p in np.split(x, [50, 51, 120]))
    scaler = Scaler.from_moments(merged)
    _, std = finalize(merged)
    assert scaler.scale[0] == 1.0 and scaler.scale[1] == 1.0
    assert scaler.scale[2] == pytest.approx(np.std(x[:, 2], ddof=1), rel=1e-12)
    assert scaler.scale[3] == pytest.approx(np.std(x[:, 3], ddof=1), rel=1e-12)
    assert scaler.scale[4] == 1.0 and scaler.mean[4] == 3.0
    assert std[2] == scaler.scale[2]

    nothing = Scaler.from_moments(Moments.empty(["a"]))
    assert nothing.mean[0] == 0.0 and nothing.scale[0] == 1.0
    # a larger eps treats more features as constant
    assert Scaler.from_moments(merged, eps=1e-3).scale[2] == 1.0


@FAST
@given(datasets())
def test_scaler_round_trips(data: tuple[np.ndarray, list[int]]) -> None:
    x, _ = data
    names = [f"f{j}" for j in range(x.shape[1])]
    scaler = Scaler.from_moments(Moments.from_array(x, names))
    z = scaler.transform(x)
    back = scaler.inverse_transform(z)
    np.testing.assert_array_equal(np.isnan(back), np.isnan(x))
    for j in range(x.shape[1]):
        col = x[:, j]
        ok = ~np.isnan(col)
        if ok.any():
            np.testing.assert_allclose(back[ok, j], col[ok], rtol=1e-12, atol=1e-12 * np.abs(col[ok]).max())
    restored = Scaler.from_dict(json.loads(json.dumps(scaler.to_dict(), allow_nan=False)))
    assert restored == scaler


def test_standardized_pooled_data_has_zero_mean_unit_std() -> None:
    rng = np.random.default_rng(5)
    x = np.column_stack([50 + 10 * rng.standard_normal(500), EPOCH + 40 * DAY * rng.standard_normal(500)])
    parts = np.split(x, [100, 350])
    scaler = Scaler.from_moments(merge_all(Moments.from_array(p, ["age", "t"]) for p in parts))
    z = np.vstack([scaler.transform(p) for p in parts])
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(z.std(axis=0, ddof=1), 1.0, rtol=1e-12)
    with pytest.raises(ValueError):
        scaler.transform(np.ones((2, 3)))
    with pytest.raises(ValueError):
        Scaler.from_dict({"feature_names": ["a"], "mean": [0.0], "scale": [0.0]})
    with pytest.raises(ValueError):
        Scaler.from_dict({"feature_names": ["a"], "mean": [0.0], "scale": [1.0], "extra": 1})


# ------------------------------------------------------------------------------------------
# disclosure control
# ------------------------------------------------------------------------------------------


def assert_plain(record: Any, string_keys: set[str]) -> None:
    """Only int/float in lists or scalars, str only under the allowed keys; JSON without NaN."""
    json.dumps(record, allow_nan=False)
    assert type(record) is dict
    for key, value in record.items():
        assert type(key) is str
        items = value if type(value) is list else [value]
        for item in items:
            if key in string_keys:
                assert type(item) is str
            else:
                assert type(item) in (int, float), (key, type(item))


def test_site_below_min_cell_count_is_withheld_entirely() -> None:
    rng = np.random.default_rng(1)
    x = 60 + 5 * rng.standard_normal((7, 2))
    released = suppress(Moments.from_array(x, ["age", "bmi"]), min_cell_count=10)
    assert released.withheld and released.released == (False, False)
    record = released.to_record()
    assert record == {
        "feature_names": ["age", "bmi"],
        "withheld": 1,
        "persons": 0,
        "released": [0, 0],
        "n": [],
        "mean": [],
        "m2": [],
    }
    assert_plain(record, {"feature_names"})
    back = Released.from_record(record)
    assert back == released
    assert back.to_moments() == Moments.empty(["age", "bmi"])


def test_feature_with_few_values_is_withheld_alone() -> None:
    rng = np.random.default_rng(2)
    x = 60 + 5 * rng.standard_normal((40, 3))
    x[5:, 1] = np.nan  # 5 values of a rare lab
    m = Moments.from_array(x, ["age", "lab", "bmi"])
    released = suppress(m, min_cell_count=10)
    assert not released.withheld and released.released == (True, False, True)
    record = released.to_record()
    assert_plain(record, {"feature_names"})
    assert record["n"] == [40, 40] and record["persons"] == 40 and record["released"] == [1, 0, 1]
    assert len(record["mean"]) == len(record["m2"]) == 2
    assert 5 not in record["n"] and float(m.mean[1]) not in record["mean"]
    # server side: the withheld feature contributes nothing, the others exactly their moments
    server = Released.from_record(json.loads(json.dumps(record))).to_moments()
    np.testing.assert_array_equal(server.n, [40, 0, 40])
    np.testing.assert_array_equal(server.mean[[0, 2]], m.mean[[0, 2]])
    np.testing.assert_array_equal(server.m2[[0, 2]], m.m2[[0, 2]])
    assert server.mean[1] == 0.0 and server.m2[1] == 0.0


@FAST
@given(datasets(), st.integers(1, 30))
def test_released_records_hold_only_numbers_and_names(data: tuple[np.ndarray, list[int]], k: int) -> None:
    x, _ = data
    names = [f"f{j}" for j in range(x.shape[1])]
    m = Moments.from_array(x, names)
    released = suppress(m, k)
    record = released.to_record()
    assert_plain(record, {"feature_names"})
    assert set(record) == {"feature_names", "withheld", "persons", "released", "n", "mean", "m2"}
    assert all(v >= k for v in record["n"])
    assert record["persons"] == 0 or record["persons"] >= k
    assert Released.from_record(record) == released
    expected = [int(len(x) >= k and c >= k and (len(x) - c == 0 or len(x) - c >= k)) for c in m.n]
    assert record["released"] == expected
    # no small cell by differencing: persons missing a released feature is 0 or at least k
    if record["persons"]:
        assert all(record["persons"] - c == 0 or record["persons"] - c >= k for c in record["n"])


def test_malformed_records_are_rejected() -> None:
    good = suppress(Moments.from_array(np.arange(20.0)[:, None], ["a"]), 10).to_record()
    for bad in (
        {**good, "extra": 1},
        {**good, "withheld": True},
        {**good, "n": [20.0]},
        {**good, "n": [-1]},
        {**good, "m2": [-1.0]},
        {**good, "released": [0]},
        {**good, "withheld": 1},
        {k: v for k, v in good.items() if k != "persons"},
    ):
        with pytest.raises(ValueError):
            Released.from_record(bad)
    with pytest.raises(ValueError):
        suppress(Moments.empty(["a"]), 0)


# ------------------------------------------------------------------------------------------
# differential privacy
# ------------------------------------------------------------------------------------------


def test_gaussian_sigma_formulas() -> None:
    from scipy.stats import norm

    for eps, delta in [(0.1, 1e-5), (0.5, 1e-6), (1.0, 1e-5), (4.0, 1e-8)]:
        sigma = gaussian_sigma(eps, delta)

        def achieved(s: float, eps: float = eps) -> float:
            return norm.cdf(0.5 / s - eps * s) - math.exp(eps) * norm.cdf(-0.5 / s - eps * s)

        assert achieved(sigma) == pytest.approx(delta, rel=1e-6)  # tight
        assert achieved(0.99 * sigma) > delta  # and minimal
        if eps < 1:
            classic = gaussian_sigma(eps, delta, mechanism="classic")
            assert classic == pytest.approx(math.sqrt(2 * math.log(1.25 / delta)) / eps, rel=1e-15)
            assert sigma < classic
        assert gaussian_sigma(eps, delta, 3.0) == pytest.approx(3 * sigma, rel=1e-15)
    assert gaussian_sigma(1.0, 1e-5) == pytest.approx(3.73, abs=0.01)  # Balle & Wang's example
    with pytest.raises(ValueError, match="epsilon < 1"):
        gaussian_sigma(1.0, 1e-5, mechanism="classic")
    for bad in [(0.0, 1e-5), (1.0, 0.0), (1.0, 1.0), (math.inf, 1e-5)]:
        with pytest.raises(ValueError):
            gaussian_sigma(*bad)


def test_noise_scales_form_one_mechanism_of_unit_sensitivity() -> None:
    bounds = [(0.0, 120.0), (10.0, 60.0), (-1.0, 1.0)]
    split = (0.2, 0.3, 0.5)
    scales = dp_noise_scales(bounds, 0.8, 1e-6, split=split)
    r = np.array([60.0, 25.0, 1.0])
    sensitivities = np.concatenate([[1.0], np.ones(3), r, r**2])
    sigmas = np.concatenate([[scales.persons], scales.n, scales.s1, scales.s2])
    # scaled by its sigma, one person moves the released vector by exactly 1/sigma_1 in L2
    assert math.sqrt(np.sum((sensitivities / sigmas) ** 2)) == pytest.approx(1 / scales.sigma_1, rel=1e-12)
    # and each block uses its share of the budget
    assert np.sum((1 / scales.n) ** 2) + (1 / scales.persons) ** 2 == pytest.approx(0.2 / scales.sigma_1**2)
    assert np.sum((r / scales.s1) ** 2) == pytest.approx(0.3 / scales.sigma_1**2)
    assert np.sum((r**2 / scales.s2) ** 2) == pytest.approx(0.5 / scales.sigma_1**2)


def test_huge_epsilon_gives_nearly_true_moments() -> None:
    rng = np.random.default_rng(11)
    x = np.column_stack([50 + 10 * rng.standard_normal(500), 1 + rng.random(500)])
    x[::7, 1] = np.nan
    bounds = [(0.0, 100.0), (0.0, 3.0)]
    noisy = noisy_moments(x, ["age", "v"], bounds, 1e6, 1e-5, rng)
    true = Moments.from_array(np.clip(x, [0.0, 0.0], [100.0, 3.0]), ["age", "v"])
    np.testing.assert_array_equal(noisy.n, true.n)
    assert noisy.persons == 500
    np.testing.assert_allclose(noisy.mean, true.mean, rtol=1e-3)
    np.testing.assert_allclose(finalize(noisy)[1], finalize(true)[1], rtol=1e-3)


def test_values_are_clipped_to_the_public_bounds() -> None:
    x = np.array([[-50.0], [5.0], [500.0]] * 10)
    noisy = noisy_moments(x, ["a"], [(0.0, 10.0)], 1e6, 1e-5, np.random.default_rng(0))
    assert noisy.mean[0] == pytest.approx(5.0, abs=1e-3)
    assert finalize(noisy)[1][0] == pytest.approx(np.std(np.clip(x, 0, 10), ddof=1), rel=1e-3)


def test_empirical_noise_matches_documented_sigma() -> None:
    rng = np.random.default_rng(12)
    x = np.column_stack([40 + 15 * rng.standard_normal(200), rng.random(200)])
    x[:20, 1] = np.nan
    bounds = [(0.0, 100.0), (0.0, 1.0)]
    eps, delta = 0.5, 1e-5
    clipped = np.clip(x, [0.0, 0.0], [100.0, 1.0]) - np.array([50.0, 0.5])
    true_n = (~np.isnan(x)).sum(axis=0)
    true_s1 = np.nansum(clipped, axis=0)
    true_s2 = np.nansum(clipped**2, axis=0)
    draws = [noisy_sums(x, ["a", "b"], bounds, eps, delta, rng) for _ in range(2000)]
    scales = dp_noise_scales(bounds, eps, delta)
    assert scales.sigma_1 == pytest.approx(gaussian_sigma(eps, delta))
    np.testing.assert_allclose(np.std([d.persons - 200 for d in draws]), scales.persons, rtol=0.1)
    np.testing.assert_allclose(np.std([d.n - true_n for d in draws], axis=0), scales.n, rtol=0.1)
    np.testing.assert_allclose(np.std([d.s1 - true_s1 for d in draws], axis=0), scales.s1, rtol=0.1)
    np.testing.assert_allclose(np.std([d.s2 - true_s2 for d in draws], axis=0), scales.s2, rtol=0.1)
    assert np.all(np.abs(np.mean([d.s1 - true_s1 for d in draws], axis=0)) <= 0.2 * scales.s1)  # unbiased
    classic = dp_noise_scales(bounds, eps, delta, mechanism="classic")
    assert classic.sigma_1 == pytest.approx(math.sqrt(2 * math.log(1.25 / delta)) / eps)


@FAST
@given(
    st.integers(0, 2**32 - 1),
    st.integers(0, 30),
    st.sampled_from([0.01, 0.1, 1.0, 10.0]),
    st.sampled_from([(0.0, 1.0), (-5.0, 5.0), (EPOCH - 365 * DAY, EPOCH + 365 * DAY)]),
)
def test_noisy_moments_are_always_valid(seed: int, rows: int, eps: float, bound: tuple[float, float]) -> None:
    rng = np.random.default_rng(seed)
    lo, hi = bound
    x = lo + (hi - lo) * rng.random((rows, 2))
    x[rng.random((rows, 2)) < 0.3] = np.nan
    m = noisy_moments(x, ["a", "b"], [bound, bound], eps, 1e-6, rng)
    assert np.all(m.n >= 0) and np.all(m.m2 >= 0) and m.persons >= int(m.n.max())
    has = m.n > 0
    assert np.all((m.mean[has] >= lo) & (m.mean[has] <= hi))
    assert np.all(m.m2 <= m.n * ((hi - lo) / 2) ** 2 * (1 + 1e-12))
    assert suppress(m, 10).to_record()  # noisy moments go through disclosure control as usual


def test_noisy_moments_reject_bad_parameters() -> None:
    x = np.ones((3, 1))
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="bounds"):
        noisy_moments(x, ["a"], [(1.0, 1.0)], 1.0, 1e-5, rng)
    with pytest.raises(ValueError, match="split"):
        noisy_moments(x, ["a"], [(0.0, 1.0)], 1.0, 1e-5, rng, split=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="Generator"):
        noisy_moments(x, ["a"], [(0.0, 1.0)], 1.0, 1e-5, 42)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# purity
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [omopfl.moments, omopfl.suppression, omopfl.moment_noise])
def test_stats_is_pure(module: Any) -> None:
    tree = ast.parse(Path(module.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0
            if node.module == "omopfl.moments":
                continue  # the pure moments module is the only omopfl import allowed
            imported.add((node.module or "").split(".")[0])
    banned = {"sqlalchemy", "flwr", "torch", "pydicom", "great_expectations"}
    assert not imported & banned
    assert imported <= {"__future__", "math", "collections", "dataclasses", "types", "typing", "numpy", "pandas"}


def test_small_cells_cannot_be_recovered_by_differencing() -> None:
    """A 0/1 feature whose count of ones (mean * n) is a small cell, or a feature missing in a small
    number of persons (persons - n), is withheld even though n itself is large."""
    rng = np.random.default_rng(0)
    n = 200
    rare = np.zeros(n)
    rare[:3] = 1.0  # 3 persons with a rare condition
    common = (rng.random(n) < 0.4).astype(float)
    lab = rng.normal(7.0, 1.0, n)
    lab[:7] = np.nan  # 7 persons missing the lab
    complete = rng.normal(50.0, 5.0, n)
    x = np.column_stack([rare, common, lab, complete])
    names = ["rare", "common", "lab", "complete"]
    m = Moments.from_array(x, names)
    assert binary_columns(x) == (True, True, False, False)
    released = suppress(m, 10, binary=binary_columns(x))
    assert released.released == (False, True, False, True)
    record = released.to_record()
    assert len(record["n"]) == 2 and 3 not in record["n"] and 193 not in record["n"]
    # without the binary flags the rare mean (3/200) would have been released
    assert suppress(m, 10).released[0] is True
