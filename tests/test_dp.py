"""DP-SGD local training and the whole-study accounting (omopfl.dp); real torch + Opacus, fast, one thread."""

from __future__ import annotations

import json
import math
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

from omopfl import dp
from omopfl.models import SiteTensors, build_model, evaluate, get_weights
from omopfl.study import ModelSpec

torch.set_num_threads(1)

N, F = 400, 6
MLP = ModelSpec(kind="mlp", hidden=(16, 8), dropout=(0.2, 0.1))


@pytest.fixture(scope="module")
def tensors() -> SiteTensors:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(N, F)).astype(np.float32)
    w = np.array([1.5, -1.0, 0.8, 0.0, 0.0, 2.0])
    y = (rng.random(N) < 1.0 / (1.0 + np.exp(-(x @ w - 0.5)))).astype(np.float32)
    return SiteTensors(torch.from_numpy(x), torch.from_numpy(y), [f"f{i}" for i in range(F)])


def _train(model, tensors, **kw):
    args = {"epochs": 2, "batch_size": 40, "lr": 0.05, "noise_multiplier": 1.0, "max_grad_norm": 1.0, "seed": 1}
    args.update(kw)
    return dp.train_local_dp(model, tensors, np.arange(tensors.n), **args)


# ------------------------------------------------------------------------------------------
# calibration
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("epsilon", "n", "batch", "epochs", "rounds"),
                         [(1.0, 1000, 64, 2, 5), (3.0, 450, 32, 1, 20), (8.0, 5000, 128, 1, 50), (0.5, 300, 300, 1, 3)])
def test_calibration_spends_the_target_over_the_whole_study(epsilon, n, batch, epochs, rounds):
    spec = dp.DPSpec(target_epsilon=epsilon, delta=1e-5, max_grad_norm=1.0)
    sigma = dp.calibrate(spec, n, batch, epochs, rounds)
    schedule = [dp.round_step(sigma, n, batch, epochs)] * rounds
    spent = dp.epsilon_spent(schedule, spec.delta)
    assert 0.98 * epsilon <= spent <= epsilon
    # the accountant over the whole schedule in one Opacus entry says the same
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    q = min(1.0, batch / n)
    accountant.history = [(sigma, q, rounds * epochs * int(1 / q))]
    assert accountant.get_epsilon(delta=spec.delta) == pytest.approx(spent, rel=1e-9)
    # and it is (nearly) the least noise that does: 2 % less noise overspends
    assert dp.epsilon_spent([dp.round_step(0.98 * sigma, n, batch, epochs)] * rounds, spec.delta) > epsilon


def test_smaller_epsilon_needs_more_noise_and_the_plan_reports_it():
    sigmas = [dp.calibrate(dp.DPSpec(e, 1e-6), 1200, 64, 1, 10) for e in (1.0, 3.0, 8.0)]
    assert sigmas[0] > sigmas[1] > sigmas[2] > 0
    plan = dp.DPSpec(3.0, 1e-6, max_grad_norm=0.5).plan(1200, 64, 1, 10)
    assert plan.noise_multiplier == sigmas[1]
    assert plan.noise_std == pytest.approx(0.5 * sigmas[1])
    assert plan.sample_rate == pytest.approx(64 / 1200)
    assert plan.steps_per_round == int(1200 / 64)
    assert plan.expected_batch_size == pytest.approx(64.0)
    assert plan.planned_epsilon <= 3.0
    assert json.loads(json.dumps(plan.to_dict()))["noise_multiplier"] == sigmas[1]


def test_bad_budgets_are_refused():
    with pytest.raises(ValueError, match="target_epsilon"):
        dp.DPSpec(0.0)
    with pytest.raises(ValueError, match="delta"):
        dp.DPSpec(1.0, delta=1.0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        dp.DPSpec(1.0, max_grad_norm=-1)
    with pytest.raises(ValueError, match="1 / n_train"):
        dp.calibrate(dp.DPSpec(1.0, delta=0.01), 200, 32, 1, 5)


# ------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [ModelSpec(kind="logistic"), MLP], ids=["logistic", "mlp"])
def test_training_changes_weights_keeps_a_plain_model_and_is_seeded(spec, tensors):
    model = build_model(spec, F, seed=0)
    keys = list(model.state_dict())
    before = get_weights(model)
    result = _train(model, tensors, delta=1e-5)
    after = get_weights(model)
    assert list(model.state_dict()) == keys  # no "_module." prefixes
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert not model.training
    for module in model.modules():  # no Opacus hooks or per-sample gradients left on the caller's model
        assert not module._forward_hooks and not module._backward_hooks
    for p in model.parameters():
        assert getattr(p, "grad_sample", None) is None and p.grad is None
    q = 40 / N
    assert result["n"] == N and math.isfinite(result["loss"])
    assert result["step"] == (1.0, q, 2 * int(1 / q)) and result["steps"] == 20
    assert result["epsilon"] == pytest.approx(dp.epsilon_spent([result["step"]], 1e-5))

    again = build_model(spec, F, seed=0)
    _train(again, tensors)
    assert all(np.array_equal(a, b) for a, b in zip(after, get_weights(again), strict=True))
    other = build_model(spec, F, seed=0)
    _train(other, tensors, seed=2)
    assert any(not np.array_equal(a, b) for a, b in zip(after, get_weights(other), strict=True))


def test_unseeded_training_draws_fresh_noise(tensors):
    a, b = build_model(ModelSpec(kind="logistic"), F, seed=0), build_model(ModelSpec(kind="logistic"), F, seed=0)
    _train(a, tensors, seed=None, epochs=1)
    _train(b, tensors, seed=None, epochs=1)
    assert any(not np.array_equal(x, y) for x, y in zip(get_weights(a), get_weights(b), strict=True))


def test_dp_training_learns_with_moderate_noise(tensors):
    model = build_model(ModelSpec(kind="logistic"), F, seed=0)
    sigma = dp.calibrate(dp.DPSpec(8.0, 1e-5), N, 40, 5, 1)
    _train(model, tensors, epochs=5, noise_multiplier=sigma, lr=0.1)
    assert evaluate(model, tensors, np.arange(N))["auc"] > 0.75


def _per_example_clipped_mean(model, tensors, clip):
    """Reference: one gradient per row by autograd, each clipped to L2 norm ``clip``, averaged over all rows."""
    loss_fn = torch.nn.BCEWithLogitsLoss()
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for i in range(tensors.n):
        logit = model(x=tensors.x[i:i + 1])
        grads = torch.autograd.grad(loss_fn(logit, tensors.y[i:i + 1]), params)
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for t, g in zip(total, grads, strict=True):
            t += factor * g
    return [t / tensors.n for t in total]


def test_per_example_clipping_bounds_the_update(tensors):
    """Without noise and with every row in the one batch (q = 1), one SGD step moves the weights by exactly
    lr times the mean of the per-example clipped gradients: at most lr * C, however large the gradients.
    In float64, so that the comparison is not blurred by float32 rounding of the weights."""
    lr, clip = 0.5, 1e-3
    tensors = SiteTensors(tensors.x.double(), tensors.y.double(), tensors.feature_names)
    model = build_model(ModelSpec(kind="logistic"), F, seed=0).double()
    with torch.no_grad():
        model.linear.weight.mul_(50.0)  # large per-example gradients
    start = [p.detach().clone() for p in model.parameters()]
    expected = _per_example_clipped_mean(model, tensors, clip)
    result = _train(model, tensors, epochs=1, batch_size=N, lr=lr, noise_multiplier=0.0, max_grad_norm=clip,
                    optimizer="sgd")
    assert result["step"] == (0.0, 1.0, 1)
    deltas = [p.detach() - s for p, s in zip(model.parameters(), start, strict=True)]
    for d, e in zip(deltas, expected, strict=True):
        torch.testing.assert_close(d, -lr * e, rtol=1e-7, atol=1e-12)
    moved = math.sqrt(sum(float((d**2).sum()) for d in deltas))
    assert 0 < moved <= lr * clip * (1 + 1e-5)
    # the same step without clipping (a huge bound) moves far more
    free = build_model(ModelSpec(kind="logistic"), F, seed=0).double()
    with torch.no_grad():
        free.linear.weight.mul_(50.0)
    _train(free, tensors, epochs=1, batch_size=N, lr=lr, noise_multiplier=0.0, max_grad_norm=1e6, optimizer="sgd")
    moved_free = math.sqrt(sum(float(((p.detach() - s) ** 2).sum())
                               for p, s in zip(free.parameters(), start, strict=True)))
    assert moved_free > 100 * moved
    assert dp.epsilon_spent([result["step"]], 1e-5) == math.inf  # no noise, no privacy


def test_fedprox_term_pulls_towards_the_global_weights(tensors):
    plain, prox = build_model(MLP, F, seed=0), build_model(MLP, F, seed=0)
    start = get_weights(plain)
    _train(plain, tensors, optimizer="sgd", lr=0.2)
    _train(prox, tensors, optimizer="sgd", lr=0.2, proximal_mu=5.0)

    def distance(model):
        return sum(float(((w - s) ** 2).sum()) for w, s in zip(get_weights(model), start, strict=True))

    assert distance(prox) < distance(plain)


def test_an_empty_poisson_sample_still_takes_its_step(tensors):
    model = build_model(ModelSpec(kind="logistic"), F, seed=0)
    result = dp.train_local_dp(model, tensors, np.arange(3), epochs=4, batch_size=1, lr=0.05,
                               noise_multiplier=1.0, max_grad_norm=1.0, seed=0)
    assert result["steps"] == 12  # int(1 / (1/3)) = 3 steps per epoch, some of them on no row


@pytest.mark.parametrize("kind", ["cnn", "fusion"])
def test_other_model_kinds_are_refused_by_name(kind, tensors):
    model = build_model(ModelSpec(kind=kind), F, image_size=8)
    with pytest.raises(ValueError, match=f"not the '{kind}' model"):
        _train(model, tensors)


def test_bad_training_settings_are_refused(tensors):
    model = build_model(ModelSpec(kind="logistic"), F)
    with pytest.raises(ValueError, match="noise_multiplier"):
        _train(model, tensors, noise_multiplier=-1.0)
    with pytest.raises(ValueError, match="at least one train row"):
        dp.train_local_dp(model, tensors, [], epochs=1, batch_size=8, lr=0.1, noise_multiplier=1.0,
                          max_grad_norm=1.0)
    with pytest.raises(ValueError, match="row indices"):
        dp.train_local_dp(model, tensors, [N], epochs=1, batch_size=8, lr=0.1, noise_multiplier=1.0,
                          max_grad_norm=1.0)
    with pytest.raises(ValueError, match="needs delta"):
        _train(model, tensors, target_epsilon=1.0)


# ------------------------------------------------------------------------------------------
# accountant state and budget
# ------------------------------------------------------------------------------------------


def test_epsilon_grows_with_rounds_and_the_round_past_the_budget_is_refused(tensors):
    spec = dp.DPSpec(target_epsilon=2.0, delta=1e-5)
    rounds, epochs, batch = 3, 1, 50
    sigma = dp.calibrate(spec, N, batch, epochs, rounds)
    model = build_model(ModelSpec(kind="logistic"), F, seed=0)
    stored = "[]"  # the site keeps the accountant state as JSON between rounds
    spent = []
    for r in range(rounds):
        history = dp.history_from_json(stored)
        step = dp.round_step(sigma, N, batch, epochs)
        assert not dp.would_exceed(history, step, spec.target_epsilon, spec.delta)
        result = dp.train_local_dp(model, tensors, np.arange(N), epochs=epochs, batch_size=batch, lr=0.05,
                                   noise_multiplier=sigma, max_grad_norm=spec.max_grad_norm, seed=r,
                                   history=history, delta=spec.delta, target_epsilon=spec.target_epsilon)
        assert history[-1] == step == result["step"]
        assert result["epsilon"] == pytest.approx(dp.epsilon_spent(history, spec.delta))
        spent.append(result["epsilon"])
        stored = dp.history_to_json(history)
    assert 0 < spent[0] < spent[1] < spent[2] <= spec.target_epsilon
    assert spent[2] >= 0.98 * spec.target_epsilon
    history = dp.history_from_json(stored)
    assert len(history) == rounds
    assert dp.would_exceed(history, dp.round_step(sigma, N, batch, epochs), spec.target_epsilon, spec.delta)
    before = get_weights(model)
    with pytest.raises(dp.PrivacyBudgetExceeded, match="budget 2"):
        dp.train_local_dp(model, tensors, np.arange(N), epochs=epochs, batch_size=batch, lr=0.05,
                          noise_multiplier=sigma, max_grad_norm=1.0, seed=9, history=history,
                          delta=spec.delta, target_epsilon=spec.target_epsilon)
    assert len(history) == rounds  # nothing recorded, nothing trained
    assert all(np.array_equal(a, b) for a, b in zip(before, get_weights(model), strict=True))


def test_accountant_state_round_trips_and_is_checked():
    history = [(1.1, 0.05, 20), (1.1, 0.05, 20), (2.0, 0.1, 10)]
    text = dp.history_to_json(history)
    assert json.loads(text) == [[1.1, 0.05, 20], [1.1, 0.05, 20], [2.0, 0.1, 10]]
    assert dp.history_from_json(text) == history
    assert dp.history_from_json(json.loads(text)) == history
    assert dp.epsilon_spent([], 1e-5) == 0.0
    assert dp.epsilon_spent(history[:2], 1e-5) == pytest.approx(dp.epsilon_spent([(1.1, 0.05, 40)], 1e-5))
    for bad in ('{"a": 1}', "[[1.0, 0.5]]", "[[1.0, 1.5, 3]]", "[[-1.0, 0.5, 3]]", "[[1.0, 0.5, 2.5]]",
                "[[true, 0.5, 3]]", '[["x", 0.5, 3]]'):
        with pytest.raises(ValueError):
            dp.history_from_json(bad)
