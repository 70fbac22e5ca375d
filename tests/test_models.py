"""Models, local training, FedProx, metrics and inputs (omopfl.models); fast, CPU, one thread."""

from __future__ import annotations

import copy
import math
import os
import pickle
import subprocess
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score, roc_auc_score

from omopfl import models
from omopfl.models import (
    SiteTensors,
    binary_metrics,
    build_model,
    evaluate,
    get_weights,
    local_loss,
    predict_proba,
    set_weights,
    split,
    train_local,
    weighted_average,
)
from omopfl.moments import Moments, Scaler
from omopfl.prepare import PreparedSite
from omopfl.study import ModelSpec

torch.set_num_threads(1)


def scaler_for(x: np.ndarray, names: list[str]) -> Scaler:
    return Scaler.from_moments(Moments.from_array(x, names))


def tabular_site(n: int = 600, k: int = 5, seed: int = 0, missing: float = 0.0) -> PreparedSite:
    """A separable-ish logistic problem with offsets and scales (so standardization matters)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k))
    coef = np.array([2.0, -1.5, 1.0, 0.0, 0.8][:k] + [0.0] * max(0, k - 5))
    p = 1.0 / (1.0 + np.exp(-(z @ coef - 0.3)))
    y = (rng.random(n) < p).astype(np.float32)
    x = (z * np.arange(1, k + 1) * 10 + 100).astype(np.float32)
    if missing:
        x[rng.random(x.shape) < missing] = np.nan
    return PreparedSite("s", x, y, [f"f{j}" for j in range(k)])


def blob_site(n: int, size: int = 32, seed: int = 0) -> PreparedSite:
    """Noise images; positives carry one bright Gaussian blob at a random place."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.float32)
    rng.shuffle(y)
    images = rng.uniform(0.0, 0.4, size=(n, size, size)).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in np.flatnonzero(y):
        cy, cx = rng.integers(5, size - 5, size=2)
        images[i] += 0.8 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 2.0**2))
    x = np.zeros((n, 1), np.float32)
    return PreparedSite("s", x, y, ["f0"], images=np.clip(images, 0, 1), image_mask=np.ones(n, bool))


# --------------------------------------------------------------------------------------------
# import, build, forward
# --------------------------------------------------------------------------------------------


def test_import_does_not_load_torch() -> None:
    code = "import sys, omopfl.models; assert 'torch' not in sys.modules and 'sklearn' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("kind", ["logistic", "mlp", "cnn", "fusion", "densenet121"])
def test_every_kind_builds_and_gives_one_logit_per_person(kind: str) -> None:
    n, k, genes, size = 6, 7, 5, 32
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, k)).astype(np.float32)
    images = rng.random((n, size, size)).astype(np.float32)
    image_mask = np.array([1, 0, 1, 0, 1, 1], bool)
    images[~image_mask] = 0.0
    omics = rng.gamma(2.0, 10.0, size=(n, genes)).astype(np.float32)
    omics[[1, 4]] = np.nan  # two persons without omics
    omics[0, 2] = np.nan  # one gene missing for one person
    prepared = PreparedSite("s", x, (np.arange(n) % 2).astype(np.float32), [f"f{j}" for j in range(k)],
                            images=images, image_mask=image_mask, omics=omics)
    tensors = SiteTensors.from_prepared(prepared, scaler_for(x, prepared.feature_names))
    assert tensors.images.shape == (n, 1, size, size) and tensors.images.dtype == torch.float32
    assert tensors.omics.shape == (n, genes)
    assert tensors.omics_mask.tolist() == [1, 0, 1, 1, 0, 1]
    assert torch.isfinite(tensors.omics).all() and (tensors.omics[[1, 4]] == 0).all()

    model = build_model(ModelSpec(kind), k, n_genes=genes if kind == "fusion" else 0, image_size=size)
    assert model.kind == kind
    out = model(**tensors.batch(np.arange(n)))
    assert out.shape == (n,) and torch.isfinite(out).all()
    if kind == "fusion":
        # a person without an image: the image branch gives nothing but the learned offset
        batch = tensors.batch([1])
        noisy = {**batch, "images": torch.randn_like(batch["images"])}
        assert torch.equal(model(**batch), model(**noisy))
        # a site that has no images or omics at all still runs
        assert model(x=tensors.x).shape == (n,)
    # pickles by name and deep-copies
    clone = pickle.loads(pickle.dumps(model))
    assert type(clone).__name__ == type(model).__name__
    assert torch.equal(copy.deepcopy(model)(**tensors.batch([0, 2])), model(**tensors.batch([0, 2])))


def test_mlp_layout_follows_the_spec() -> None:
    model = build_model(ModelSpec("mlp"), 9)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (9, 256), (256, 512), (512, 128), (128, 64), (64, 32), (32, 1)]
    rates = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert rates == [0.4, 0.4, 0.15, 0.15, 0.15]
    small = build_model(ModelSpec("mlp", hidden=(16, 8), dropout=(0.3, 0.1)), 4)
    assert [m.p for m in small.modules() if isinstance(m, torch.nn.Dropout)] == [0.3, 0.1]


def test_build_model_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="unknown model kind"):
        build_model(ModelSpec("transformer"), 3)
    with pytest.raises(ValueError, match="image_size"):
        build_model(ModelSpec("cnn"), 3)
    with pytest.raises(ValueError, match="tabular feature"):
        build_model(ModelSpec("mlp"), 0)
    with pytest.raises(ValueError, match="image_size >= 32"):
        build_model(ModelSpec("densenet121"), 0, image_size=16)


def test_densenet121_is_the_papers_network() -> None:
    """DenseNet-121: 4 dense blocks of 6, 12, 24, 16 layers (each two convolutions), growth rate 32."""
    model = build_model(ModelSpec("densenet121"), 0, image_size=32)
    blocks = [m for name, m in model.named_modules() if name.count(".") == 2 and "denseblock" in name]
    assert [len(list(b.children())) for b in blocks] == [6, 12, 24, 16]
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 + 2 * (6 + 12 + 24 + 16) + 3  # stem, dense layers, transitions (+ 1 linear = 121)
    grown = [m.out_channels for m in convs if m.kernel_size == (3, 3) and m.in_channels == 128]
    assert grown and set(grown) == {32}
    assert 6_900_000 < sum(p.numel() for p in model.parameters()) < 7_000_000
    names = list(model.state_dict())
    assert any(n.endswith("running_mean") for n in names)  # batch-norm buffers travel with the weights


def test_densenet121_learns_bright_blob_versus_no_blob() -> None:
    prepared = blob_site(160, size=32, seed=1)
    tensors = SiteTensors.from_prepared(prepared, Scaler(("f0",), [0.0], [1.0]))
    train, test = split(tensors.n, 0.25, seed=0, y=prepared.y)
    model = build_model(ModelSpec("densenet121"), 1, image_size=32, seed=0)
    train_local(model, tensors, train, epochs=2, batch_size=24, lr=0.001, seed=0)
    assert evaluate(model, tensors, test)["auc"] > 0.75


def test_init_is_deterministic_and_weights_round_trip() -> None:
    spec = ModelSpec("fusion", hidden=(16, 8))
    a = build_model(spec, 4, n_genes=3, image_size=16, seed=7)
    b = build_model(spec, 4, n_genes=3, image_size=16, seed=7)
    c = build_model(spec, 4, n_genes=3, image_size=16, seed=8)
    wa, wb, wc = get_weights(a), get_weights(b), get_weights(c)
    assert all(np.array_equal(u, v) for u, v in zip(wa, wb, strict=True))
    assert not all(np.array_equal(u, v) for u, v in zip(wa, wc, strict=True))
    set_weights(c, wa)
    assert all(np.array_equal(u, v) for u, v in zip(get_weights(c), wa, strict=True))
    wa[0][...] = 99.0  # copies: changing them does not change the model
    assert not np.array_equal(get_weights(a)[0], wa[0])
    with pytest.raises(ValueError, match="expected"):
        set_weights(c, wa[:-1])
    with pytest.raises(ValueError, match="shape"):
        set_weights(c, [np.zeros((1, 1)), *wa[1:]])
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    build_model(spec, 4, image_size=16, seed=1)
    assert torch.equal(torch.rand(1), before)  # torch's global random state is left alone


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


def test_nan_imputed_with_global_means_is_zero_after_standardization() -> None:
    x = np.array([[1.0, np.nan], [np.nan, 4.0], [3.0, 8.0]], np.float32)
    names = ["a", "b"]
    scaler = Scaler(tuple(names), np.array([2.5, 5.0]), np.array([0.5, 2.0]))  # a global scaler
    tensors = SiteTensors.from_prepared(PreparedSite("s", x, np.array([0, 1, 0], np.float32), names), scaler)
    expected = np.array([[-3.0, 0.0], [0.0, -0.5], [1.0, 1.5]], np.float32)
    assert np.array_equal(tensors.x.numpy(), expected)
    with pytest.raises(ValueError, match="feature names"):
        SiteTensors.from_prepared(PreparedSite("s", x, np.zeros(3, np.float32), ["a", "c"]), scaler)
    with pytest.raises(ValueError, match="labels"):
        SiteTensors.from_prepared(PreparedSite("s", x, np.array([0, 2, 0], np.float32), names), scaler)


def test_image_resize_and_omics_scaler() -> None:
    n = 4
    images = np.ones((n, 8, 8), np.float32)
    images[1] = np.nan
    omics = np.array([[0.0, 1.0], [np.e - 1, np.nan], [np.nan, np.nan], [1.0, 3.0]], np.float32)
    prepared = PreparedSite("s", np.zeros((n, 1), np.float32), np.zeros(n, np.float32), ["f"], images=images,
                            image_mask=np.array([1, 1, 0, 1], bool), omics=omics, gene_names=["g1", "g2"])
    gene_scaler = Scaler(("g1", "g2"), np.array([0.5, 1.0]), np.array([0.5, 2.0]))
    t = SiteTensors.from_prepared(prepared, Scaler(("f",), [0.0], [1.0]), image_size=4, omics_scaler=gene_scaler)
    assert t.images.shape == (n, 1, 4, 4)
    assert t.images[0].eq(1).all() and t.images[1].eq(0).all() and t.images[2].eq(0).all()
    assert t.image_mask.tolist() == [1, 1, 0, 1]
    expected = (np.log1p(omics.astype(np.float64)) - [0.5, 1.0]) / [0.5, 2.0]
    expected = np.where(np.isnan(expected), 0.0, expected)
    assert np.allclose(t.omics.numpy(), expected, atol=1e-6)
    assert t.omics_mask.tolist() == [1, 1, 0, 1]
    # local fallback: per-gene mean 0 and sample std 1 over the persons who have the gene
    local = SiteTensors.from_prepared(prepared, Scaler(("f",), [0.0], [1.0]))
    g1 = local.omics.numpy()[[0, 1, 3], 0]
    assert abs(g1.mean()) < 1e-6 and abs(g1.std(ddof=1) - 1.0) < 1e-5


def test_split_is_deterministic_and_stratified() -> None:
    y = np.array([1] * 30 + [0] * 170)
    train, test = split(200, 0.25, seed=3, y=y)
    again_train, again_test = split(200, 0.25, seed=3, y=y)
    assert np.array_equal(train, again_train) and np.array_equal(test, again_test)
    assert not np.array_equal(test, split(200, 0.25, seed=4, y=y)[1])
    assert np.intersect1d(train, test).size == 0 and np.union1d(train, test).tolist() == list(range(200))
    assert y[test].sum() == round(0.25 * 30) and (y[test] == 0).sum() == round(0.25 * 170)
    # a rare class still reaches both sides; one class and no labels fall back to a plain split
    rare = np.array([1, 1] + [0] * 98)
    tr, te = split(100, 0.1, seed=0, y=rare)
    assert rare[te].sum() == 1 and rare[tr].sum() == 1
    assert len(split(100, 0.2, seed=0, y=np.zeros(100))[1]) == 20
    assert len(split(100, 0.2, seed=0)[1]) == 20
    assert len(split(10, 0.0, seed=0)[1]) == 0


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------


def test_metrics_equal_sklearn_on_a_known_vector() -> None:
    y = np.array([0, 0, 1, 1, 0, 1, 0, 1, 1, 0])
    p = np.array([0.1, 0.6, 0.8, 0.4, 0.2, 0.9, 0.5, 0.7, 0.3, 0.05])
    m = binary_metrics(y, p)
    pred = (p >= 0.5).astype(int)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["kappa"] == pytest.approx(cohen_kappa_score(y, pred))
    assert m["n"] == 10
    one_class = binary_metrics(np.ones(4), [0.9, 0.8, 0.7, 0.2])
    assert math.isnan(one_class["auc"]) and one_class["accuracy"] == 0.75
    assert math.isnan(binary_metrics(np.zeros(3), np.zeros(3))["kappa"])


def test_evaluate_matches_sklearn_on_the_model_predictions() -> None:
    prepared = tabular_site(120, seed=2)
    tensors = SiteTensors.from_prepared(prepared, scaler_for(prepared.x, prepared.feature_names))
    model = build_model(ModelSpec("logistic"), tensors.n_features, seed=1)
    idx = np.arange(0, 120, 2)
    result = evaluate(model, tensors, idx)
    p = predict_proba(model, tensors, idx)
    y = prepared.y[idx]
    assert result["auc"] == pytest.approx(roc_auc_score(y, p))
    eps = 1e-12
    bce = -np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps))
    assert result["loss"] == pytest.approx(bce, rel=1e-6)
    assert result["n"] == 60
    assert evaluate(model, tensors, [])["n"] == 0


def test_weighted_average_weights_by_n_and_skips_nan() -> None:
    out = weighted_average([(10, {"auc": 0.8, "loss": 1.0, "n": 10}),
                            (30, {"auc": math.nan, "loss": 2.0, "n": 30}),
                            (0, {"auc": 0.1, "loss": 9.0})])
    assert out == {"auc": pytest.approx(0.8), "loss": pytest.approx(1.75), "n": 40}
    assert math.isnan(weighted_average([(5, {"auc": math.nan})])["auc"])


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


def test_logistic_regression_learns_and_matches_sklearn() -> None:
    prepared = tabular_site(800, seed=0, missing=0.05)
    tensors = SiteTensors.from_prepared(prepared, scaler_for(prepared.x, prepared.feature_names))
    train, test = split(tensors.n, 0.25, seed=0, y=prepared.y)
    model = build_model(ModelSpec("logistic"), tensors.n_features, seed=0)
    result = train_local(model, tensors, train, epochs=30, batch_size=64, lr=0.05, seed=0)
    assert result["n"] == len(train) and math.isfinite(result["loss"])
    ours = evaluate(model, tensors, test)
    assert ours["auc"] > 0.8
    x, y = tensors.x.numpy(), prepared.y
    reference = LogisticRegression(max_iter=1000).fit(x[train], y[train])
    theirs = roc_auc_score(y[test], reference.predict_proba(x[test])[:, 1])
    assert abs(ours["auc"] - theirs) < 0.03
    # training is reproducible from the seed
    again = build_model(ModelSpec("logistic"), tensors.n_features, seed=0)
    train_local(again, tensors, train, epochs=30, batch_size=64, lr=0.05, seed=0)
    assert all(np.array_equal(u, v) for u, v in zip(get_weights(model), get_weights(again), strict=True))


def test_fedprox_term_pulls_toward_the_global_weights() -> None:
    prepared = tabular_site(300, seed=5)
    tensors = SiteTensors.from_prepared(prepared, scaler_for(prepared.x, prepared.feature_names))
    idx = np.arange(tensors.n)
    spec = ModelSpec("mlp", hidden=(16, 8))
    model = build_model(spec, tensors.n_features, seed=0)
    global_weights = get_weights(model)
    shifted = [w + 0.1 for w in global_weights]
    mu = 2.0
    plain = local_loss(model, tensors, idx)
    prox = local_loss(model, tensors, idx, proximal_mu=mu, global_params=shifted)
    squared = sum(float(((w - s) ** 2).sum()) for w, s in zip(global_weights, shifted, strict=True))
    assert prox > plain
    assert prox - plain == pytest.approx(0.5 * mu * squared, rel=1e-4)
    assert local_loss(model, tensors, idx, proximal_mu=mu) == pytest.approx(plain)  # default: own weights

    def distance(m: torch.nn.Module) -> float:
        return math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(get_weights(m), global_weights,
                                                                            strict=True)))

    free = build_model(spec, tensors.n_features, seed=0)
    train_local(free, tensors, idx, epochs=3, batch_size=32, lr=0.01, seed=0)
    held = build_model(spec, tensors.n_features, seed=0)
    train_local(held, tensors, idx, epochs=3, batch_size=32, lr=0.01, seed=0, proximal_mu=10.0,
                global_params=global_weights)
    assert distance(held) < 0.7 * distance(free)
    default_anchor = build_model(spec, tensors.n_features, seed=0)
    train_local(default_anchor, tensors, idx, epochs=3, batch_size=32, lr=0.01, seed=0, proximal_mu=10.0)
    assert all(np.allclose(u, v) for u, v in zip(get_weights(default_anchor), get_weights(held), strict=True))


def test_sgd_option_and_argument_checks() -> None:
    prepared = tabular_site(100, seed=1)
    tensors = SiteTensors.from_prepared(prepared, scaler_for(prepared.x, prepared.feature_names))
    model = build_model(ModelSpec("logistic"), tensors.n_features)
    before = get_weights(model)
    result = train_local(model, tensors, np.arange(100), epochs=2, batch_size=16, lr=0.1, optimizer="sgd")
    assert result["n"] == 100 and not np.array_equal(before[0], get_weights(model)[0])
    assert math.isnan(train_local(model, tensors, [], epochs=1, batch_size=8, lr=0.1)["loss"])
    with pytest.raises(ValueError, match="optimizer"):
        train_local(model, tensors, [0], epochs=1, batch_size=8, lr=0.1, optimizer="lbfgs")
    with pytest.raises(ValueError, match="row indices"):
        train_local(model, tensors, [100], epochs=1, batch_size=8, lr=0.1)


def test_cnn_learns_bright_blob_versus_no_blob() -> None:
    prepared = blob_site(320, size=32, seed=0)
    tensors = SiteTensors.from_prepared(prepared, Scaler(("f0",), [0.0], [1.0]))
    train, test = split(tensors.n, 0.25, seed=0, y=prepared.y)
    model = build_model(ModelSpec("cnn"), 1, image_size=32, seed=0)
    train_local(model, tensors, train, epochs=4, batch_size=32, lr=0.01, seed=0)
    assert evaluate(model, tensors, test)["auc"] > 0.75


def test_classes_are_reachable_by_name() -> None:
    assert models.FusionModel.__name__ == "FusionModel"
    with pytest.raises(AttributeError):
        _ = models.NoSuchModel
