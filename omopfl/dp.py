"""DP-SGD for a site's local training, and the privacy accounting of a whole study at one site.

A site that trains under differential privacy replaces :func:`omopfl.models.train_local` by
:func:`train_local_dp`: every step draws a Poisson sample of the site's train rows (each row
independently with probability ``q = batch_size / n_train``), computes one gradient per row,
clips each to L2 norm ``max_grad_norm`` over all parameters, sums them, adds Gaussian noise of
standard deviation ``noise_multiplier * max_grad_norm`` to every coordinate and divides by the
expected batch size ``q * n_train`` before the optimizer's update.  Per-example gradients,
clipping, noise and Poisson sampling are Opacus's (``GradSampleModule``, ``DPOptimizer``,
``DPDataLoader``); the accounting is Opacus's Renyi-DP accountant (``RDPAccountant``).  What is
omopfl's own is only the schedule (how many steps a study takes at a site), the calibration of the
noise to a whole-study budget, the persisted accountant state and the budget check.

Guarantee
---------
Per site, over the whole study: the sequence of weights a site sends (every round's update) is
``(target_epsilon, delta)``-differentially private with respect to adding or removing one row of
that site's train split, when the site trains the schedule the noise was calibrated for
(``rounds x local_epochs`` epochs of ``int(1 / q)`` Poisson-sampled steps each, see
:func:`calibrate`) and refuses any round past its budget (:func:`would_exceed`).  The prepared
dataset holds one row per person (omopfl's validation checks it), so a row is a person: the
guarantee is person-level at that site.  It holds whatever the coordinator does with the weights
(post-processing), whatever weights it sends as the starting point of a round (the clipping bound
holds for any weights) and across any number of sites (each site spends its own budget on its own
persons; a person present at two sites is protected at each separately, the epsilons add).

Accounting
----------
The accountant's state is Opacus's ``RDPAccountant.history``: a list of
``(noise_multiplier, sample_rate, steps)`` entries (:data:`Step`), one per round trained.  The site
keeps it between rounds as JSON (:func:`history_to_json`, :func:`history_from_json`),
:func:`epsilon_spent` converts it to the epsilon spent at a delta, and :func:`would_exceed` tells
whether one more round (:func:`round_step`) would spend more than the budget.  RDP composition over
the entries is exact (RDP adds up; the per-step RDP of each ``(noise_multiplier, sample_rate)`` is
Opacus's ``compute_rdp``, cached, and summed as ``RDPAccountant`` sums it); the conversion to
``(epsilon, delta)`` is Opacus's (the bound of Balle et al. 2020 over its default orders), so the
epsilon is an upper bound, not the tight value a PRV accountant would give.

What it does not cover
----------------------
* Anything a site sends besides the weights: the training loss :func:`train_local_dp` returns is
  computed on the private rows and is NOT private, nor is the number of train rows (``n``, the
  FedAvg weight; the accounting treats ``n_train`` and hence ``q`` as public), nor evaluation
  metrics or federated statistics.  Those need the site's release rule or their own DP mechanism
  (:mod:`omopfl.moment_noise` has one for the moments), and their epsilons add to this one.
* Rows outside the train split (the test rows are never trained on: they are not at risk from the
  weights, but from the evaluation metrics).
* Repeated studies over the same persons: each approved study has its own budget; epsilons of
  several studies add.
* Secret randomness.  The guarantee assumes the sampling and the noise are unknown to the
  adversary.  With ``seed=None`` (what a site must use in production) :func:`train_local_dp` seeds
  torch's generators from ``os.urandom``; a ``seed`` chosen or known by the coordinator makes the
  noise reproducible and voids the guarantee (use seeds in tests and benchmarks only).  torch's
  generators are not cryptographically secure (Opacus's full ``secure_mode`` needs ``torchcsprng``,
  which does not install beside torch 2.13); the noise is drawn as Opacus's ``secure_mode`` draws
  it (a sum of four Gaussians) against the known floating-point attacks on Gaussian sampling.
* Models other than ``logistic`` and ``mlp`` (refused): the image and omics branches have not been
  checked with Opacus's per-example gradients here.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from omopfl.models import SiteTensors

__all__ = [
    "DP_MODEL_KINDS",
    "DPPlan",
    "DPSpec",
    "PrivacyBudgetExceeded",
    "Step",
    "calibrate",
    "epsilon_spent",
    "history_from_json",
    "history_to_json",
    "round_step",
    "sample_rate",
    "steps_per_epoch",
    "train_local_dp",
    "would_exceed",
]

DP_MODEL_KINDS = ("logistic", "mlp")
"""Model kinds :func:`train_local_dp` trains (the tabular ones)."""

Step = tuple[float, float, int]
"""One accountant entry: ``(noise_multiplier, sample_rate, steps)``, as in Opacus's ``RDPAccountant.history``."""

_ACCOUNTANT = "rdp"


class PrivacyBudgetExceeded(RuntimeError):
    """A round would spend more than the site's privacy budget for the study."""


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number")
    return value


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer")
    return int(value)


def _check_delta(delta: float) -> float:
    delta = float(delta)
    if not (math.isfinite(delta) and 0.0 < delta < 1.0):
        raise ValueError("delta must be in (0, 1)")
    return delta


@dataclass(frozen=True)
class DPSpec:
    """A site's DP-SGD budget for one study.

    Attributes
    ----------
    target_epsilon:
        Epsilon the whole study may spend at this site (all rounds together), ``> 0``.
    delta:
        Delta of the guarantee, in ``(0, 1)``; it must be below ``1 / n_train`` of the site
        (:meth:`plan` and :func:`calibrate` refuse otherwise), the usual choice is far below
        (``1e-6`` for sites of up to some ten thousand persons).
    max_grad_norm:
        Per-example clipping bound ``C`` (L2 norm over all parameters), ``> 0``.  The noise's
        standard deviation is ``noise_multiplier * C``.
    """

    target_epsilon: float
    delta: float = 1e-6
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        _positive("target_epsilon", self.target_epsilon)
        _check_delta(self.delta)
        _positive("max_grad_norm", self.max_grad_norm)

    def plan(self, n_train: int, batch_size: int, local_epochs: int, rounds: int) -> DPPlan:
        """The derived values of this budget for a site's schedule (calibrates the noise)."""
        noise = calibrate(self, n_train, batch_size, local_epochs, rounds)
        q = sample_rate(n_train, batch_size)
        per_round = round_step(noise, n_train, batch_size, local_epochs)
        history = [per_round] * int(rounds)
        return DPPlan(spec=self, n_train=int(n_train), batch_size=int(batch_size), local_epochs=int(local_epochs),
                      rounds=int(rounds), sample_rate=q, steps_per_round=per_round[2],
                      expected_batch_size=q * int(n_train), noise_multiplier=noise,
                      noise_std=noise * float(self.max_grad_norm),
                      planned_epsilon=epsilon_spent(history, self.delta))


@dataclass(frozen=True)
class DPPlan:
    """What a :class:`DPSpec` means for one site's schedule (:meth:`DPSpec.plan`).

    Attributes
    ----------
    sample_rate:
        ``q = min(1, batch_size / n_train)``: each train row's chance to be in a step's batch.
    steps_per_round:
        ``local_epochs * int(1 / q)`` optimizer steps per round.
    expected_batch_size:
        ``q * n_train``, the denominator of the averaged noisy gradient.
    noise_multiplier, noise_std:
        Calibrated ``sigma`` and the noise's standard deviation ``sigma * max_grad_norm``.
    planned_epsilon:
        Epsilon the accountant gives for all ``rounds`` rounds (at most ``target_epsilon``).
    """

    spec: DPSpec
    n_train: int
    batch_size: int
    local_epochs: int
    rounds: int
    sample_rate: float
    steps_per_round: int
    expected_batch_size: float
    noise_multiplier: float
    noise_std: float
    planned_epsilon: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe values (for a run report or the site's audit log)."""
        return {"target_epsilon": self.spec.target_epsilon, "delta": self.spec.delta,
                "max_grad_norm": self.spec.max_grad_norm, "n_train": self.n_train, "batch_size": self.batch_size,
                "local_epochs": self.local_epochs, "rounds": self.rounds, "sample_rate": self.sample_rate,
                "steps_per_round": self.steps_per_round, "expected_batch_size": self.expected_batch_size,
                "noise_multiplier": self.noise_multiplier, "noise_std": self.noise_std,
                "planned_epsilon": self.planned_epsilon, "accountant": _ACCOUNTANT}


# --------------------------------------------------------------------------------------------
# schedule and calibration
# --------------------------------------------------------------------------------------------


def sample_rate(n_train: int, batch_size: int) -> float:
    """Poisson sampling rate ``min(1, batch_size / n_train)``."""
    n_train = _positive_int("n_train", n_train)
    batch_size = _positive_int("batch_size", batch_size)
    return min(1.0, batch_size / n_train)


def steps_per_epoch(q: float) -> int:
    """Steps of one epoch at sampling rate ``q``: ``int(1 / q)``, as Opacus's Poisson sampler takes."""
    if not (math.isfinite(q) and 0.0 < q <= 1.0):
        raise ValueError("sample rate must be in (0, 1]")
    return max(1, int(1.0 / q))


def round_step(noise_multiplier: float, n_train: int, batch_size: int, local_epochs: int) -> Step:
    """The accountant entry one round of :func:`train_local_dp` adds (``epochs = local_epochs``)."""
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError("noise_multiplier must be >= 0")
    q = sample_rate(n_train, batch_size)
    return (float(noise_multiplier), q, _positive_int("local_epochs", local_epochs) * steps_per_epoch(q))


def calibrate(spec: DPSpec, n_train: int, batch_size: int, local_epochs: int, rounds: int) -> float:
    """The noise multiplier that makes the whole study spend (just under) ``spec.target_epsilon``.

    The schedule is ``rounds * local_epochs`` epochs of ``int(1 / q)`` steps at sampling rate
    ``q = min(1, batch_size / n_train)``, what :func:`train_local_dp` takes; Opacus's
    ``get_noise_multiplier`` searches the smallest noise whose RDP epsilon at ``spec.delta`` is at
    most the target, to within 0.5 % of it (or 0.01, whichever is smaller).

    Parameters
    ----------
    spec:
        The budget.
    n_train:
        The site's train rows (treated as public: the site sends it as the FedAvg weight).
    batch_size, local_epochs, rounds:
        The study's training settings.

    Returns
    -------
    float
        ``sigma``: the noise's standard deviation is ``sigma * spec.max_grad_norm``.

    Raises
    ------
    ValueError
        Non-positive sizes, ``delta >= 1 / n_train``, or a budget no noise below 1e6 can meet.
    """
    n_train = _positive_int("n_train", n_train)
    if spec.delta >= 1.0 / n_train:
        raise ValueError(f"delta {spec.delta:g} must be below 1 / n_train = {1.0 / n_train:g}")
    q = sample_rate(n_train, batch_size)
    steps = _positive_int("rounds", rounds) * _positive_int("local_epochs", local_epochs) * steps_per_epoch(q)
    return _noise_for(float(spec.target_epsilon), float(spec.delta), q, steps)


@functools.lru_cache(maxsize=64)
def _noise_for(target_epsilon: float, delta: float, q: float, steps: int) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    tolerance = min(0.01, 0.005 * target_epsilon)
    with warnings.catch_warnings():  # "optimal order is the largest alpha" while the search tries small noise
        warnings.simplefilter("ignore", UserWarning)
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=q,
                                          steps=steps, accountant=_ACCOUNTANT, epsilon_tolerance=tolerance))


# --------------------------------------------------------------------------------------------
# accountant state
# --------------------------------------------------------------------------------------------


def _step(entry: Any) -> Step:
    if isinstance(entry, str | bytes) or not isinstance(entry, Sequence) or len(entry) != 3:
        raise ValueError("an accountant entry is [noise_multiplier, sample_rate, steps]")
    noise, q, steps = entry
    if any(isinstance(v, bool) for v in entry):
        raise ValueError("an accountant entry holds numbers, not booleans")
    noise, q = float(noise), float(q)
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError("accountant entry: noise_multiplier must be >= 0")
    if not (math.isfinite(q) and 0.0 < q <= 1.0):
        raise ValueError("accountant entry: sample_rate must be in (0, 1]")
    if int(steps) != steps or steps < 0:
        raise ValueError("accountant entry: steps must be a non-negative integer")
    return (noise, q, int(steps))


def history_to_json(history: Iterable[Sequence[float]]) -> str:
    """The accountant state as JSON text: a list of ``[noise_multiplier, sample_rate, steps]``."""
    return json.dumps([list(_step(e)) for e in history])


def history_from_json(text: str | bytes | list[Any]) -> list[Step]:
    """The accountant state from :func:`history_to_json`'s text (or its parsed list); checks every entry."""
    data = json.loads(text) if isinstance(text, str | bytes) else text
    if not isinstance(data, list):
        raise ValueError("the accountant state must be a JSON list")
    return [_step(e) for e in data]


def epsilon_spent(history: Iterable[Sequence[float]], delta: float) -> float:
    """Epsilon spent at ``delta`` by the accountant entries ``history`` (0 when empty; inf with no noise)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as privacy_analysis

    entries = [_step(e) for e in history]
    entries = [e for e in entries if e[2] > 0]
    if not entries:
        return 0.0
    if any(e[0] == 0 for e in entries):
        return math.inf
    rdp = sum(steps * _rdp_per_step(noise, q) for noise, q, steps in entries)
    with warnings.catch_warnings():  # a bound at the largest order is looser, still an upper bound
        warnings.simplefilter("ignore", UserWarning)
        eps, _order = privacy_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp,
                                                         delta=_check_delta(delta))
    return float(eps)


@functools.lru_cache(maxsize=256)
def _rdp_per_step(noise_multiplier: float, q: float) -> np.ndarray:
    """Opacus's RDP of one subsampled Gaussian step at its default orders (cached: about 25 ms per call).

    ``RDPAccountant.get_privacy_spent`` computes ``compute_rdp(q, sigma, steps, orders)``, which is
    this times ``steps``, per entry and sums over the entries; the cache only saves the recomputation
    a site's history of equal rounds would cost.
    """
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as privacy_analysis

    values = privacy_analysis.compute_rdp(q=q, noise_multiplier=noise_multiplier, steps=1,
                                          orders=RDPAccountant.DEFAULT_ALPHAS)
    values.setflags(write=False)
    return values


def would_exceed(history: Iterable[Sequence[float]], next_step: Sequence[float], target_epsilon: float,
                 delta: float) -> bool:
    """Whether training ``next_step`` after ``history`` would spend more than ``target_epsilon`` at ``delta``.

    A site calls it before each round with ``round_step(...)`` and refuses the round when True.
    The calibration leaves the last planned round just under the target, so a study that keeps to
    its schedule is never refused and the first round past it always is.
    """
    target = _positive("target_epsilon", target_epsilon)
    return epsilon_spent([*history, _step(next_step)], delta) > target


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


def _model_kind(model: Any) -> str:
    kind = getattr(model, "kind", None)
    if kind not in DP_MODEL_KINDS:
        name = kind if isinstance(kind, str) else type(model).__name__
        raise ValueError(f"DP-SGD supports the {' and '.join(DP_MODEL_KINDS)} models only, not the {name!r} model")
    return str(kind)


def train_local_dp(
    model: torch.nn.Module,
    tensors: SiteTensors,
    train_idx: Any,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    noise_multiplier: float,
    max_grad_norm: float,
    seed: int | None = None,
    history: list[Step] | None = None,
    delta: float | None = None,
    target_epsilon: float | None = None,
    proximal_mu: float = 0.0,
    global_params: Sequence[Any] | None = None,
    optimizer: str = "adam",
) -> dict[str, Any]:
    """Train ``model`` in place with DP-SGD on the rows ``train_idx`` (rules in the module docstring).

    Training runs on a deep copy wrapped in Opacus's ``GradSampleModule``; at the end the trained
    weights are loaded into ``model``, which therefore has no Opacus hooks, no ``grad_sample``
    attributes and the same plain ``state_dict`` keys as before.  It is left in eval mode, as
    :func:`omopfl.models.train_local` leaves it.

    Parameters
    ----------
    model:
        A ``logistic`` or ``mlp`` model from :func:`omopfl.models.build_model` (others: ValueError).
    tensors, train_idx:
        The site's inputs and its train rows.
    epochs:
        Passes of ``int(1 / q)`` Poisson-sampled steps each, ``q = min(1, batch_size / len(train_idx))``.
    batch_size:
        Expected batch size (actual batches vary under Poisson sampling).
    lr:
        Learning rate of the optimizer.
    noise_multiplier:
        ``sigma`` (from :func:`calibrate`); 0 trains with clipping and no noise (no privacy: epsilon inf).
    max_grad_norm:
        Per-example clipping bound.
    seed:
        None (production): sampling, noise and dropout from fresh OS entropy.  An int makes the
        run reproducible, for tests and benchmarks only (a known seed voids the guarantee).
    history:
        The site's accountant entries so far; this call's entry is appended to the list in place.
    delta:
        When given, the result has ``epsilon``: the total spent at ``delta`` after this call.
    target_epsilon:
        When given (with ``delta``), the call refuses to train, before touching the model, if this
        round would take ``history`` past the budget (:class:`PrivacyBudgetExceeded`).
    proximal_mu, global_params:
        FedProx as in :func:`omopfl.models.train_local`.  The proximal gradient
        ``mu * (w - w_global)`` does not depend on the data, so it is added after clipping and
        noise (post-processing: no privacy cost, never clipped).
    optimizer:
        ``"adam"`` (default) or ``"sgd"`` (momentum 0.9), applied to the noisy gradient.

    Returns
    -------
    dict
        ``n`` (train rows, the FedAvg weight), ``loss`` (mean BCE over the last epoch's sampled
        rows; computed on private data and NOT private: do not release it unprotected), ``step``
        (this call's accountant entry ``(noise_multiplier, sample_rate, steps)``),
        ``noise_multiplier``, ``sample_rate``, ``steps`` and, with ``delta``, ``epsilon``.

    Raises
    ------
    ValueError
        An unsupported model kind (named), bad settings, rows out of range, no train rows.
    PrivacyBudgetExceeded
        The round would overspend ``target_epsilon`` (only when ``target_epsilon`` and ``delta`` are given).
    """
    import torch
    from opacus import GradSampleModule
    from opacus.accountants import RDPAccountant
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizer
    from opacus.validators import ModuleValidator

    from omopfl.models import _proximal_targets, _rows

    _model_kind(model)
    epochs = _positive_int("epochs", epochs)
    batch_size = _positive_int("batch_size", batch_size)
    lr = _positive("lr", lr)
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError("noise_multiplier must be >= 0")
    max_grad_norm = _positive("max_grad_norm", max_grad_norm)
    if not (math.isfinite(proximal_mu) and proximal_mu >= 0):
        raise ValueError("proximal_mu must be >= 0")
    if optimizer not in ("adam", "sgd"):
        raise ValueError("optimizer must be 'adam' or 'sgd'")
    if target_epsilon is not None and delta is None:
        raise ValueError("target_epsilon needs delta")
    rows = _rows(train_idx, tensors.n)
    if rows.size == 0:
        raise ValueError("DP-SGD needs at least one train row")
    planned = round_step(noise_multiplier, int(rows.size), batch_size, epochs)
    past = list(history) if history is not None else []
    if target_epsilon is not None and delta is not None and would_exceed(past, planned, target_epsilon, delta):
        raise PrivacyBudgetExceeded(
            f"this round would spend epsilon {epsilon_spent([*past, planned], delta):.4g} > budget {target_epsilon:g}")
    q = planned[1]
    if seed is None:
        seeds = [int.from_bytes(os.urandom(8), "little") & (2**63 - 1) for _ in range(3)]
    else:
        seeds = [int(seed), int(seed) + 1, int(seed) + 2]
    work = copy.deepcopy(model).train()
    errors = ModuleValidator.validate(work, strict=False)
    if errors:
        raise ValueError(f"the model has layers DP-SGD cannot train: {errors[0]}")
    pairs = _proximal_targets(work, global_params) if proximal_mu > 0 else []
    sampler_gen = torch.Generator().manual_seed(seeds[0])
    noise_gen = torch.Generator().manual_seed(seeds[1])
    dataset = torch.utils.data.TensorDataset(torch.as_tensor(rows))
    loader = DPDataLoader(dataset, sample_rate=q, generator=sampler_gen)
    if len(loader) != planned[2] // epochs:  # the accounting assumes Opacus's sampler takes int(1/q) steps
        raise RuntimeError(f"Opacus's sampler takes {len(loader)} steps per epoch, expected {planned[2] // epochs}")
    gsm = GradSampleModule(work, batch_first=True, loss_reduction="mean", strict=True)
    params = [p for p in gsm.parameters() if p.requires_grad]
    base = (torch.optim.Adam(params, lr=lr) if optimizer == "adam"
            else torch.optim.SGD(params, lr=lr, momentum=0.9))
    dp_opt = DPOptimizer(base, noise_multiplier=float(noise_multiplier), max_grad_norm=max_grad_norm,
                         expected_batch_size=q * rows.size, loss_reduction="mean", generator=noise_gen,
                         secure_mode=True)
    accountant = RDPAccountant()
    dp_opt.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=q))
    loss_fn = torch.nn.BCEWithLogitsLoss()
    last = math.nan
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # Opacus's backward hooks on the first layer, whose input needs no gradient: harmless.
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            torch.manual_seed(seeds[2])  # dropout masks
            gsm.train()
            for _ in range(epochs):
                total, seen = 0.0, 0
                for (b,) in loader:
                    dp_opt.zero_grad(set_to_none=True)
                    logits = gsm(**tensors.batch(b))
                    if b.numel():
                        bce = loss_fn(logits, tensors.y.index_select(0, b))
                        total += float(bce.detach()) * int(b.numel())
                        seen += int(b.numel())
                    else:  # an empty Poisson sample still takes its (noise-only) step
                        bce = logits.sum()
                    bce.backward()
                    if dp_opt.pre_step():
                        if pairs:
                            with torch.no_grad():
                                for p, g in pairs:
                                    p.grad.add_(p.detach() - g, alpha=float(proximal_mu))
                        base.step()
                last = total / seen if seen else math.nan
    finally:
        dp_opt.zero_grad(set_to_none=True)
        gsm._close()
    model.load_state_dict(work.state_dict(), strict=True)
    model.eval()
    done = [_step(e) for e in accountant.history]
    steps = sum(e[2] for e in done)
    if steps != planned[2]:
        raise RuntimeError(f"DP-SGD took {steps} steps, the accountant planned {planned[2]}")
    step = (float(noise_multiplier), q, steps)
    if history is not None:
        history.append(step)
    result: dict[str, Any] = {"n": int(rows.size), "loss": last, "step": step,
                              "noise_multiplier": float(noise_multiplier), "sample_rate": q, "steps": steps}
    if delta is not None:
        result["epsilon"] = epsilon_spent([*past, step], delta)
    return result
