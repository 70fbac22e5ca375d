"""Strategy settings in the study, the local optimizer, FedNova and SCAFFOLD (issue 14b).

* ``[training]`` strategy settings parse with Flower's defaults and fail in one line naming the key;
* FedAdam with the study's eta/betas/tau gives, on fixed replies, exactly the update rule written out
  by hand; a federated FedAdam run's strategy object carries the study's settings;
* :func:`omopfl.models.train_local` honours SGD momentum, weight decay and a fixed number of local
  steps (compared with the update written out in numpy);
* FedNova and SCAFFOLD (:mod:`omopfl.federation.coordinator.strategies`) against their papers' update rules on toy
  quadratic sites written in numpy, including the property the papers are about (the global
  optimum, where FedAvg drifts);
* short real federated runs (in process, real sites) with each, SCAFFOLD's state across ``--resume``,
  and a site refusing local settings that differ from the study it approved.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import prepare_and_approve
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from omopfl.errors import ConfigError
from omopfl.federation.codec import FEDNOVA_A, SCAFFOLD_C_PREFIX, SCAFFOLD_DC_PREFIX
from omopfl.federation.coordinator.rounds import make_strategy
from omopfl.federation.coordinator.strategies import FedNova, Scaffold
from omopfl.federation.site.training import fednova_normaliser
from omopfl.study import load_study

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _training(base: str, lines: str) -> str:
    """The t2dm_hf study text with its ``[training]`` strategy/epochs lines replaced by ``lines``."""
    text = base.replace('local_epochs = 2\n', '').replace('strategy = "fedavg"\n', lines.strip() + "\n")
    if "learning_rate" in lines:
        text = text.replace("learning_rate = 0.05\n", "", 1)
    assert lines.strip() in text
    return text


def _study(tmp_path: Path, lines: str) -> Path:
    text = (ROOT / "examples" / "t2dm_hf" / "study.toml").read_text()
    text = text.replace('"../../cohorts/', f'"{ROOT}/cohorts/')
    path = tmp_path / "study.toml"
    path.write_text(_training(text, lines))
    return path


@contextlib.contextmanager
def _task() -> Iterator[None]:
    """Flower's task identity, which a Message needs when it is made outside a running app."""
    from omopfl.federation.flower_internals import superlink_task_identity

    with superlink_task_identity(7, 1):
        yield


def _reply(arrays: dict[str, np.ndarray], metrics: dict[str, Any], node: int) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
                          "metrics": MetricRecord(metrics)})
    return Message(content, dst_node_id=node, message_type="train")


# --------------------------------------------------------------------------------------------
# the study's strategy settings
# --------------------------------------------------------------------------------------------


def test_strategy_settings_parse_with_flower_defaults(tmp_path: Path) -> None:
    spec = load_study(_study(tmp_path, 'strategy = "fedadam"\neta = 0.05\nbeta_1 = 0.8\nbeta_2 = 0.95\ntau = 0.01\n'
                                       'optimizer = "sgd"\nmomentum = 0.5\nweight_decay = 0.001\nlocal_steps = 7'))
    t = spec.training
    assert t.server_options() == {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 0.01}
    assert (t.optimizer, t.momentum, t.weight_decay, t.local_steps) == ("sgd", 0.5, 0.001, 7)
    strategy = make_strategy(t.strategy, 0.0, t.server_options())
    assert (strategy.eta, strategy.eta_l, strategy.beta_1, strategy.beta_2, strategy.tau) == (0.05, 0.1, 0.8, 0.95,
                                                                                              0.01)
    # absent settings keep Flower's defaults for that strategy
    plain = load_study(_study(tmp_path, 'strategy = "fedyogi"')).training
    assert plain.server_options() == {} and (plain.optimizer, plain.local_steps) == ("adam", 0)
    yogi = make_strategy("fedyogi", 0.0, plain.server_options())
    assert (yogi.eta, yogi.eta_l, yogi.beta_1, yogi.beta_2, yogi.tau) == (1e-2, 0.0316, 0.9, 0.99, 1e-3)
    assert make_strategy("fedadagrad", 0.0, {"eta": 0.3}).eta == 0.3
    assert make_strategy("scaffold", 0.0, {"eta": 0.5}).eta == 0.5
    assert isinstance(make_strategy("fednova", 0.0, {}), FedNova)


@pytest.mark.parametrize(("lines", "key"), [
    ('strategy = "fedsgd"', "[training] strategy"),
    ('strategy = "fedavg"\neta = 0.1', "[training] eta"),
    ('strategy = "fedadagrad"\nbeta_1 = 0.9', "[training] beta_1"),
    ('strategy = "fedadam"\nbeta_2 = 1.0', "[training] beta_2"),
    ('strategy = "fedadam"\ntau = 0', "[training] tau"),
    ('strategy = "fedavg"\noptimizer = "lbfgs"', "[training] optimizer"),
    ('strategy = "fedavg"\nmomentum = 0.9', "[training] momentum"),
    ('strategy = "fedavg"\noptimizer = "sgd"\nmomentum = 1.5', "[training] momentum"),
    ('strategy = "fednova"', "[training] optimizer"),
    ('strategy = "scaffold"\noptimizer = "sgd"\nmomentum = 0.5', "[training] momentum"),
    ('strategy = "fedavg"\nlocal_steps = 0', "[training] local_steps"),
    ('strategy = "fedavg"\nlocal_steps = 5\nlocal_epochs = 2', "[training] local_steps"),
    ('strategy = "fedavg"\nweight_decay = -1', "[training] weight_decay"),
    ('strategy = "fedavg"\nserver_lr = 1', "[training] server_lr"),
])
def test_bad_strategy_settings_fail_in_one_line_naming_the_key(tmp_path: Path, lines: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_study(_study(tmp_path, lines))
    message = str(info.value)
    assert key in message and "\n" not in message and "study.toml" in message, message


def test_fedadam_applies_the_studys_settings_by_hand() -> None:
    """Two rounds of FedAdam on fixed replies equal Reddi et al.'s rule with Flower's bias correction."""
    eta, beta_1, beta_2, tau = 0.05, 0.8, 0.95, 0.01
    strategy = make_strategy("fedadam", 0.0, {"eta": eta, "beta_1": beta_1, "beta_2": beta_2, "tau": tau})
    x = {"w": np.array([0.5, -1.0, 2.0]), "b": np.array([0.1])}
    m = {k: np.zeros_like(v) for k, v in x.items()}
    v = {k: np.zeros_like(v) for k, v in x.items()}
    rng = np.random.default_rng(0)
    for server_round in (1, 2):
        ys = [{k: a + rng.normal(size=a.shape) for k, a in x.items()} for _ in range(3)]
        ns = [30, 10, 60]
        strategy.current_arrays = {k: a.copy() for k, a in x.items()}  # what configure_train keeps
        with _task():
            replies = [_reply(y, {"num-examples": n}, i + 1) for i, (y, n) in enumerate(zip(ys, ns, strict=True))]
        new, _metrics = strategy.aggregate_train(server_round, replies)
        for k in x:
            avg = sum(n * y[k] for y, n in zip(ys, ns, strict=True)) / sum(ns)
            delta = avg - x[k]
            m[k] = beta_1 * m[k] + (1 - beta_1) * delta
            v[k] = beta_2 * v[k] + (1 - beta_2) * delta**2
            step = eta * np.sqrt(1 - beta_2 ** (server_round + 1)) / (1 - beta_1 ** (server_round + 1))
            x[k] = x[k] + step * m[k] / (np.sqrt(v[k]) + tau)
            np.testing.assert_allclose(new[k].numpy(), x[k], rtol=1e-12, atol=1e-12)
    # the defaults would have moved elsewhere
    default = make_strategy("fedadam", 0.0, {})
    assert (default.eta, default.beta_1, default.beta_2, default.tau) != (eta, beta_1, beta_2, tau)


# --------------------------------------------------------------------------------------------
# the local optimizer
# --------------------------------------------------------------------------------------------


def _tiny_tensors(n: int = 10, k: int = 3) -> Any:
    from omopfl.models import SiteTensors
    from omopfl.moments import Moments, Scaler
    from omopfl.prepare import PreparedSite

    rng = np.random.default_rng(3)
    x = rng.normal(size=(n, k)).astype(np.float32)
    y = (rng.random(n) < 0.5).astype(np.float32)
    names = [f"f{j}" for j in range(k)]
    prepared = PreparedSite("s", x, y, names)
    return SiteTensors.from_prepared(prepared, Scaler.from_moments(Moments.from_array(x.astype(np.float64), names)))


def _logistic_gradient(w: np.ndarray, b: float, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    p = 1.0 / (1.0 + np.exp(-(x @ w + b)))
    return x.T @ (p - y) / len(y), float(np.mean(p - y))


def test_sgd_momentum_weight_decay_and_local_steps_by_hand() -> None:
    """Full-batch SGD (so the batch order cannot matter): torch's heavy ball with L2 weight decay, exactly
    ``steps`` steps, compared with the rule written out in numpy; steps are counted on a small site."""
    from omopfl.models import build_model, get_weights, train_local
    from omopfl.study import ModelSpec

    tensors = _tiny_tensors()
    tensors.x, tensors.y = tensors.x.double(), tensors.y.double()
    x = tensors.batch(np.arange(tensors.n))["x"].numpy()
    y = tensors.y.numpy()
    model = build_model(ModelSpec("logistic"), tensors.n_features, seed=1).double()
    w, b = (a.astype(np.float64) for a in get_weights(model))
    w, b = w.reshape(-1), float(b.reshape(-1)[0])
    lr, rho, wd, steps = 0.3, 0.6, 0.05, 7
    stats = train_local(model, tensors, np.arange(tensors.n), epochs=1, batch_size=tensors.n, lr=lr,
                        optimizer="sgd", momentum=rho, weight_decay=wd, steps=steps)
    assert stats["steps"] == steps
    buf_w, buf_b = np.zeros_like(w), 0.0
    for step in range(steps):
        gw, gb = _logistic_gradient(w, b, x, y)
        gw, gb = gw + wd * w, gb + wd * b
        buf_w, buf_b = (gw, gb) if step == 0 else (rho * buf_w + gw, rho * buf_b + gb)
        w, b = w - lr * buf_w, b - lr * buf_b
    trained = get_weights(model)
    np.testing.assert_allclose(trained[0].reshape(-1), w, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(trained[1].reshape(-1), [b], rtol=1e-10, atol=1e-12)

    # local_steps: a site of 10 rows with batches of 4 takes exactly 11 steps (epochs are reshuffled as needed);
    # with epochs it takes ceil(10 / 4) = 3 per epoch
    small = _tiny_tensors()
    model = build_model(ModelSpec("logistic"), small.n_features, seed=1)
    assert train_local(model, small, np.arange(10), epochs=1, batch_size=4, lr=0.1, optimizer="sgd",
                       momentum=0.0, steps=11)["steps"] == 11
    assert train_local(model, small, np.arange(10), epochs=2, batch_size=4, lr=0.1)["steps"] == 6


def test_scaffold_correction_is_added_to_every_gradient() -> None:
    """SCAFFOLD's local step ``y <- y - eta_l (g(y) + c - c_i)`` at the site, by hand."""
    from omopfl.models import build_model, get_weights, train_local
    from omopfl.study import ModelSpec

    tensors = _tiny_tensors()
    tensors.x, tensors.y = tensors.x.double(), tensors.y.double()
    x = tensors.batch(np.arange(tensors.n))["x"].numpy()
    y = tensors.y.numpy()
    model = build_model(ModelSpec("logistic"), tensors.n_features, seed=2).double()
    w, b = (a.astype(np.float64) for a in get_weights(model))
    w, b = w.reshape(-1), float(b.reshape(-1)[0])
    shift_w, shift_b = np.array([[0.2, -0.1, 0.05]]), np.array([-0.3])
    lr, steps = 0.2, 4
    train_local(model, tensors, np.arange(tensors.n), epochs=1, batch_size=tensors.n, lr=lr, optimizer="sgd",
                momentum=0.0, steps=steps, correction=[shift_w, shift_b])
    for _ in range(steps):
        gw, gb = _logistic_gradient(w, b, x, y)
        w, b = w - lr * (gw + shift_w.reshape(-1)), b - lr * (gb + shift_b[0])
    trained = get_weights(model)
    np.testing.assert_allclose(trained[0].reshape(-1), w, rtol=1e-10)
    np.testing.assert_allclose(trained[1].reshape(-1), [b], rtol=1e-10)
    with pytest.raises(ValueError, match="correction"):
        train_local(model, tensors, np.arange(4), epochs=1, batch_size=4, lr=lr, optimizer="sgd",
                    correction=[shift_b])


# --------------------------------------------------------------------------------------------
# FedNova and SCAFFOLD on a toy problem (quadratic sites with known gradients)
# --------------------------------------------------------------------------------------------

# site i: f_i(x) = 1/2 sum_j h_ij (x_j - b_ij)^2, gradient h_i * (x - b_i)
H = np.array([[1.0, 0.5, 2.0], [0.3, 1.5, 0.8], [2.0, 0.2, 0.6]])
B = np.array([[1.0, -2.0, 0.5], [-1.0, 0.0, 3.0], [2.0, 1.0, -1.0]])
N_ROWS = np.array([100, 300, 50])


def _local_sgd(x: np.ndarray, i: int, steps: int, lr: float, momentum: float = 0.0,
               shift: np.ndarray | None = None) -> np.ndarray:
    y, buf = x.copy(), np.zeros_like(x)
    for step in range(steps):
        g = H[i] * (y - B[i]) + (0.0 if shift is None else shift)
        buf = g if step == 0 else momentum * buf + g
        y = y - lr * buf
    return y


def test_fednova_follows_the_paper_and_reaches_the_weighted_optimum() -> None:
    """Sites with 2, 10 and 40 local steps (momentum 0.5): each FedNova round equals Wang et al.'s
    ``x - tau_eff * sum p_i (x - y_i) / a_i``; FedNova ends near ``argmin sum p_i f_i`` (its bias is of the
    order of the local learning rate) while FedAvg (same local work) is pulled towards the site that takes
    the most steps (a bias of order one: the objective inconsistency the paper removes)."""
    steps, lr, rho = [2, 10, 40], 0.002, 0.5
    p = N_ROWS / N_ROWS.sum()
    optimum = (p[:, None] * H * B).sum(0) / (p[:, None] * H).sum(0)
    strategy, fedavg = FedNova(weighted_by_key="num-examples"), make_strategy("fedavg", 0.0)
    x_nova = x_ref = x_avg = np.zeros(3)
    for server_round in range(1, 401):
        ys = [_local_sgd(x_nova, i, steps[i], lr, rho) for i in range(3)]
        a = [fednova_normaliser(s, rho) for s in steps]
        strategy.current_arrays = {"x": x_nova.copy()}
        with _task():
            replies = [_reply({"x": ys[i]}, {"num-examples": int(N_ROWS[i]), FEDNOVA_A: a[i]}, i + 1)
                       for i in range(3)]
            new, _ = strategy.aggregate_train(server_round, replies)
            avg, _ = fedavg.aggregate_train(server_round, [_reply({"x": _local_sgd(x_avg, i, steps[i], lr, rho)},
                                                                  {"num-examples": int(N_ROWS[i])}, i + 1)
                                                           for i in range(3)])
        # the paper's rule written out (a_i for heavy-ball SGD, tau_eff = sum p_i a_i)
        a_ref = [(s - rho * (1 - rho**s) / (1 - rho)) / (1 - rho) for s in steps]
        ys_ref = [_local_sgd(x_ref, i, steps[i], lr, rho) for i in range(3)]
        x_ref = x_ref - np.dot(p, a_ref) * sum(p[i] * (x_ref - ys_ref[i]) / a_ref[i] for i in range(3))
        x_nova, x_avg = new["x"].numpy(), avg["x"].numpy()
        np.testing.assert_allclose(x_nova, x_ref, rtol=1e-10, atol=1e-12)
    assert np.abs(x_nova - optimum).max() < 0.08
    assert np.abs(x_avg - optimum).max() > 0.5  # objective inconsistency: FedAvg's fixed point is elsewhere


def test_scaffold_follows_the_paper_and_reaches_the_optimum() -> None:
    """Option II SCAFFOLD with a global step of 0.8 and N = 4 sites of which 3 train: each round's x and
    c equal Karimireddy et al.'s rule written out in numpy; with 20 local steps on heterogeneous sites it
    converges to the optimum of the average objective, where FedAvg drifts."""
    eta_g, lr, steps, n_sites = 0.8, 0.05, 20, 4
    optimum = (H * B).sum(0) / H.sum(0)
    strategy = Scaffold(eta=eta_g, total_sites=n_sites, weighted_by_key="num-examples")
    strategy.c_global = {"x": np.zeros(3)}
    x_ref, c_ref = np.zeros(3), np.zeros(3)
    c_sites = [np.zeros(3) for _ in range(3)]
    c_sites_ref = [np.zeros(3) for _ in range(3)]
    x = np.zeros(3)
    fedavg_x = np.zeros(3)
    for server_round in range(1, 201):
        c = strategy.c_global["x"].copy()  # what the message carries beside x
        strategy.current_arrays = {"x": x.copy()}
        replies = []
        for i in range(3):
            y = _local_sgd(x, i, steps, lr, shift=c - c_sites[i])
            c_new = c_sites[i] - c + (x - y) / (steps * lr)
            dc, c_sites[i] = c_new - c_sites[i], c_new
            with _task():
                replies.append(_reply({"x": y, SCAFFOLD_DC_PREFIX + "x": dc}, {"num-examples": int(N_ROWS[i])}, i))
        new, _ = strategy.aggregate_train(server_round, replies)
        x = new["x"].numpy()
        # the paper, written out
        dy, dcs = [], []
        for i in range(3):
            y = x_ref.copy()
            for _ in range(steps):
                y = y - lr * (H[i] * (y - B[i]) - c_sites_ref[i] + c_ref)
            c_plus = c_sites_ref[i] - c_ref + (x_ref - y) / (steps * lr)
            dy.append(y - x_ref)
            dcs.append(c_plus - c_sites_ref[i])
            c_sites_ref[i] = c_plus
        x_ref = x_ref + eta_g * np.mean(dy, axis=0)
        c_ref = c_ref + len(dcs) / n_sites * np.mean(dcs, axis=0)
        np.testing.assert_allclose(x, x_ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(strategy.c_global["x"], c_ref, rtol=1e-10, atol=1e-12)
        fedavg_x = np.mean([_local_sgd(fedavg_x, i, steps, lr) for i in range(3)], axis=0)
    assert np.abs(x - optimum).max() < 1e-6
    assert np.abs(fedavg_x - optimum).max() > 0.05  # client drift


def test_strategies_refuse_replies_they_cannot_aggregate() -> None:
    nova = FedNova(weighted_by_key="num-examples")
    nova.current_arrays = {"x": np.zeros(2)}
    scaffold = Scaffold(weighted_by_key="num-examples")
    scaffold.current_arrays, scaffold.c_global = {"x": np.zeros(2)}, {"x": np.zeros(2)}
    with _task():
        assert nova.aggregate_train(1, [_reply({"x": np.ones(2)}, {"num-examples": 5}, 1)]) == (None, None)
        assert scaffold.aggregate_train(1, [_reply({"x": np.ones(2)}, {"num-examples": 5}, 1)]) == (None, None)
    assert SCAFFOLD_C_PREFIX != SCAFFOLD_DC_PREFIX


# --------------------------------------------------------------------------------------------
# real federated runs (in process, three prepared synthetic sites on DuckDB)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def federation(prepared_sites_factory) -> dict[str, Any]:
    return prepared_sites_factory("strategies", approve=False)


def _variant(federation: dict[str, Any], tag: str, lines: str) -> dict[str, Any]:
    """The federation's study with other ``[training]`` lines, prepared and approved at every site."""

    study = federation["tmp"] / f"study_{tag}.toml"
    study.write_text(_training(federation["study"].read_text(), lines))
    spec = load_study(study)
    prepared = federation["tmp"] / f"prepared_{tag}"
    prepare_and_approve(federation["adapters"], spec, prepared)
    return {"study": study, "prepared": prepared, "spec": spec}


def _train_replies(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in json.loads((run_dir / "audit.json").read_text())["replies"] if r["message_type"] == "train"]


def test_fedadam_run_uses_the_studys_server_settings(federation) -> None:
    from omopfl.federation.local import run_training

    variant = _variant(federation, "fedadam", 'strategy = "fedadam"\neta = 0.05\nbeta_1 = 0.8\nbeta_2 = 0.95\n'
                                              'tau = 0.01\nlocal_epochs = 1')
    run_dir = federation["tmp"] / "run_fedadam"
    manifest = run_training(variant["study"], federation["adapters"], variant["prepared"], out_dir=run_dir, rounds=2)
    training = manifest["training"]  # read off the strategy object the run used
    assert (training["strategy"], training["eta"], training["beta_1"], training["beta_2"], training["tau"]) == (
        "fedadam", 0.05, 0.8, 0.95, 0.01)
    assert training["eta_l"] == 0.1  # absent: Flower's default
    assert manifest["final"]["eval_auc"] is not None and manifest["final"]["train_n"] > 0
    with np.load(run_dir / "checkpoint.npz") as saved:  # FedAdam's moments are checkpointed
        assert any(name.startswith("m_t/") for name in saved.files)


def test_fednova_run_sites_take_the_studys_local_steps_and_momentum(federation) -> None:
    """Every site (1200, 800 and 450 persons) takes exactly ``local_steps`` SGD steps with the study's
    momentum: the FedNova normaliser each one reports is ``a(20, 0.5)``; pooled training uses the same
    optimizer."""
    from omopfl.federation.local import run_training
    from omopfl.pooled import train_pooled

    variant = _variant(federation, "fednova", 'strategy = "fednova"\noptimizer = "sgd"\nmomentum = 0.5\n'
                                              'weight_decay = 0.0001\nlocal_steps = 20\nlearning_rate = 0.2')
    run_dir = federation["tmp"] / "run_fednova"
    manifest = run_training(variant["study"], federation["adapters"], variant["prepared"], out_dir=run_dir,
                            rounds=2, audit=True)
    assert manifest["training"]["strategy"] == "fednova" and manifest["training"]["local_steps"] == 20
    rows = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    # it learns (at threshold 0.5 the release rule may withhold a round's evaluation at small sites)
    assert max(r["eval_auc"] or 0.0 for r in rows) > 0.6, rows
    replies = _train_replies(run_dir)
    assert len(replies) == 6
    for reply in replies:
        metrics = reply["content"]["metrics"]
        assert set(metrics) <= {"num-examples", "loss", FEDNOVA_A}
        assert metrics["num-examples"] > 0 and metrics[FEDNOVA_A] == pytest.approx(fednova_normaliser(20, 0.5))
    pooled = train_pooled(variant["study"], federation["adapters"], variant["prepared"],
                          out_dir=federation["tmp"] / "pooled_fednova", rounds=2)
    assert (pooled["config"]["training"]["optimizer"], pooled["config"]["training"]["steps"]) == ("sgd", 40)
    assert pooled["config"]["training"]["momentum"] == 0.5


def test_scaffold_run_keeps_control_variates_across_resume(federation) -> None:
    """SCAFFOLD in process: each site keeps its own c_i in its state folder; the server's c is the sum of
    the sites' changes over N (here every site trains, so c = mean c_i after round 1); after --resume the
    server's c continues from the checkpoint (the sites' c_i start again at zero in the new run)."""
    from omopfl import policy
    from omopfl.config import load_site
    from omopfl.federation.local import run_training

    variant = _variant(federation, "scaffold", 'strategy = "scaffold"\noptimizer = "sgd"\nlocal_steps = 4\n'
                                               'eta = 1.0')
    states = [policy.state_dir(load_site(a)) / "scaffold" for a in federation["adapters"]]

    def site_controls() -> dict[Path, dict[str, np.ndarray]]:
        out = {}
        for folder in states:
            for path in folder.glob("*.npz"):
                with np.load(path) as saved:
                    out[path] = {k: saved[k] for k in saved.files}
        return out

    def server_control(run_dir: Path) -> dict[str, np.ndarray]:
        with np.load(run_dir / "checkpoint.npz") as saved:
            return {k.split("/", 1)[1]: saved[k] for k in saved.files if k.startswith("c_global/")}

    run_dir = federation["tmp"] / "run_scaffold"
    manifest = run_training(variant["study"], federation["adapters"], variant["prepared"], out_dir=run_dir,
                            rounds=1, audit=True)
    assert manifest["final"]["train_n"] > 0
    first = site_controls()
    assert len(first) == 3  # one c_i per site, for this run
    c1 = server_control(run_dir)
    assert set(c1) == {"linear.weight", "linear.bias"} and any(np.abs(v).max() > 0 for v in c1.values())
    for key, value in c1.items():
        np.testing.assert_allclose(value, sum(c[key] for c in first.values()) / 3, rtol=1e-5, atol=1e-7)
    for reply in _train_replies(run_dir):
        arrays = reply["content"]["arrays"]
        assert set(arrays) == {"linear.weight", "linear.bias", SCAFFOLD_DC_PREFIX + "linear.weight",
                               SCAFFOLD_DC_PREFIX + "linear.bias"}

    manifest = run_training(variant["study"], federation["adapters"], variant["prepared"], out_dir=run_dir,
                            rounds=2, resume=True)
    assert manifest["resumed_from_round"] == 1 and manifest["final"]["round"] == 2
    second = {p: c for p, c in site_controls().items() if p not in first}
    assert len(second) == 3  # the new run's c_i (zero before its round)
    c2 = server_control(run_dir)
    for key in c1:
        np.testing.assert_allclose(c2[key], c1[key] + sum(c[key] for c in second.values()) / 3, rtol=1e-5,
                                   atol=1e-7)


def test_sites_refuse_local_settings_other_than_the_approved_ones(federation) -> None:
    """A coordinator sending other local steps (or a site-side strategy the study does not name) is refused:
    the site computes only with the study it approved."""
    from omopfl import audit
    from omopfl.config import load_site
    from omopfl.errors import ConfigError, FederationError
    from omopfl.federation.local import run_training
    from omopfl.federation.site.audit_trail import audit_path

    variant = _variant(federation, "nova_refuse", 'strategy = "fednova"\noptimizer = "sgd"\nlocal_steps = 3')
    with pytest.raises(FederationError, match="min-sites"):
        run_training(variant["study"], federation["adapters"], variant["prepared"],
                     out_dir=federation["tmp"] / "run_lying", rounds=1, extra_run_config={"local-steps": 9})
    last = audit.read(audit_path(load_site(federation["adapters"][0])))[-1]
    assert (last["message_type"], last["outcome"], last["code"]) == ("train", "refused", "settings_mismatch")
    with pytest.raises(ConfigError, match="fednova and scaffold change what a site computes"):
        run_training(variant["study"], federation["adapters"], variant["prepared"],
                     out_dir=federation["tmp"] / "run_override", rounds=1, strategy="fedavg")
