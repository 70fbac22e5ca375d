"""Models, local training, evaluation and metrics of a federated study.

This is the only module besides the federation client that uses torch, and importing it does
not import torch: torch (about 2 s) and scikit-learn (about 1.7 s) load on first use, so
:func:`split`, :func:`weighted_average` and :func:`binary_metrics` cost nothing to import on
the server side.  The network classes are built on first use too; they are reachable as
``omopfl.models.LogisticModel`` etc. (and pickle by that name), but prefer :func:`get_weights` /
:func:`set_weights` to move a model around.

Models (:func:`build_model`)
----------------------------
Every model takes the same keyword inputs (``x``, ``images``, ``image_mask``, ``omics``,
``omics_mask``; what :meth:`SiteTensors.batch` returns), uses the ones it needs and returns one
logit per person, shape ``(n,)``.

``logistic``
    One ``Linear(n_features, 1)``: logistic regression on the standardized tabular features.
``mlp``
    The dense network of the federated transcriptomics literature: ``Linear -> ReLU -> Dropout``
    blocks of widths ``spec.hidden`` (default 256-512-128-64-32), then ``Linear(., 1)``.  The
    first ``max(1, len(hidden) // 2)`` blocks use ``spec.dropout[0]`` (0.4; the wide 256 and 512
    blocks by default), the later ones ``spec.dropout[1]`` (0.15).
``cnn``
    A small plain-torch CNN for single-channel ``size x size`` slices: three
    ``Conv3x3 -> ReLU`` blocks (8, 16, 32 channels; 2x2 max pooling after the first two), then
    global average and global max pooling concatenated (64 features) and ``Linear(64, 1)``.
    Global pooling makes it independent of the image size (at least 4 pixels).
``fusion``
    Three branches whose embeddings are concatenated and fed to a head
    ``Linear(., 32) -> ReLU -> Dropout(spec.dropout[1]) -> Linear(32, 1)``: the ``mlp`` trunk on
    the tabular features (32 features by default), the ``cnn`` trunk on the image (64) and, when
    ``n_genes > 0``, an omics MLP ``n_genes -> 64 -> 32``.  Missing modalities: a person without
    an image (or omics) gets a zero input (:class:`SiteTensors` does that), the branch's embedding
    is multiplied by the person's 0/1 mask and the mask itself is appended as one more feature,
    so the head learns its own offset for "missing" and a missing modality contributes nothing
    else (and gets no gradient).

Inputs (:class:`SiteTensors`)
-----------------------------
Tabular ``x``: NaN is imputed with the GLOBAL scaler's mean (:func:`omopfl.harmonize.impute`'s
rule), then standardized ``(x - mean) / scale`` with the same scaler, so a missing value becomes
exactly 0 (its ``<m>__missing`` indicator column keeps the fact that it was missing).

Omics: ``log1p(max(v, 0))`` per gene (when ``omics_log1p``), standardized per gene, then NaN
becomes 0; a person with no finite omics value has ``omics_mask = 0``.  The standardization uses
``omics_scaler`` (a :class:`omopfl.moments.Scaler` over the log1p values, e.g. federated gene
moments) when given, else a LOCAL fallback: this site's per-gene mean and sample standard
deviation (scale 1 for genes with fewer than two values or no spread).  The local fallback is
not identical across sites (each site is centred on its own mean, which removes a site-level
shift together with real between-site differences); switch to a federated gene scaler through
``omics_scaler`` when one exists.

Images: float32 ``(n, 1, s, s)`` as linking normalized them (per image), non-finite pixels and
persons without an image set to 0, ``image_mask`` 0/1; ``image_size`` resizes (area averaging
down, bilinear up).

Training (:func:`train_local`)
------------------------------
``BCEWithLogitsLoss`` with Adam (default) or SGD (``optimizer="sgd"``, ``momentum`` default 0.9,
``weight_decay``; the study's ``[training]`` states them, issue 14b); ``steps`` > 0 trains a fixed
number of minibatch steps instead of ``epochs``.  Adam is
the default because the same learning rate then works for logistic regression, the MLP and the
CNN on standardized inputs over the few local epochs of a federated round; its moment estimates
are local state, created afresh in every call (every round), and never leave the site: FedAvg
averages the weights only.  FedProx: with ``proximal_mu > 0`` the loss gets
``mu / 2 * sum ||w - w_global||^2`` over the trainable parameters, ``w_global`` being
``global_params`` (a list like :func:`get_weights` returns) or, by default, the weights the
model had when the call began (the global model it just received).

Determinism: :func:`build_model` initializes from ``seed``; :func:`train_local` draws batches and
dropout masks from ``seed``; both leave torch's global random state as they found it.  Thread
count is the caller's business (``torch.set_num_threads(1)`` on a busy two-core machine).

Metrics
-------
:func:`evaluate` gives the mean BCE ``loss``, ``auc`` (NaN when only one class is present),
``accuracy``, ``f1`` and Cohen's ``kappa`` at threshold 0.5 (scikit-learn's functions) and
``n``.  :func:`weighted_average` combines site metrics weighted by ``n``, skipping NaN; note that
the n-weighted mean of site AUCs is not the AUC of the pooled predictions.
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from omopfl.moments import Scaler
    from omopfl.prepare import PreparedSite
    from omopfl.study import ModelSpec

__all__ = [
    "BATCHNORM_KINDS",
    "IMAGE_KINDS",
    "MODEL_KINDS",
    "SiteTensors",
    "binary_metrics",
    "build_model",
    "evaluate",
    "get_weights",
    "local_loss",
    "min_image_size",
    "predict_proba",
    "set_weights",
    "split",
    "train_local",
    "weighted_average",
]

MODEL_KINDS = ("logistic", "mlp", "cnn", "fusion", "densenet121")
"""Every model kind a study may name (the study parser and the site policy read this one tuple)."""
IMAGE_KINDS = ("cnn", "fusion", "densenet121")
"""Kinds that read the linked images (they need ``[linking.images] enabled``)."""
BATCHNORM_KINDS = ("densenet121",)
"""Kinds with batch normalisation, which DP-SGD (Opacus) cannot train."""
_CLASS_NAMES = ("LogisticModel", "MLPModel", "CNNModel", "FusionModel", "DenseNet121Model")
_MIN_IMAGE_SIZE = 4
_MIN_DENSENET_SIZE = 32  # five halvings (stem conv, max pool, three transitions) down to 1 x 1
_CNN_CHANNELS = (8, 16, 32)
_OMICS_HIDDEN = (64, 32)
_HEAD_WIDTH = 32


# --------------------------------------------------------------------------------------------
# network classes (built on first use so that importing this module does not import torch)
# --------------------------------------------------------------------------------------------


def _dropouts(dropout: Sequence[float]) -> tuple[float, float]:
    values = tuple(float(d) for d in dropout)
    if len(values) not in (1, 2) or not all(0.0 <= d < 1.0 for d in values):
        raise ValueError("model dropout must be one or two rates in [0, 1)")
    return (values[0], values[-1])


@functools.cache
def _classes() -> dict[str, type]:
    import torch
    from torch import nn

    def dense(n_in: int, hidden: Sequence[int], dropout: tuple[float, float]) -> tuple[nn.Sequential, int]:
        layers: list[nn.Module] = []
        n_first = max(1, len(hidden) // 2)
        for i, width in enumerate(hidden):
            layers += [nn.Linear(n_in, int(width)), nn.ReLU(), nn.Dropout(dropout[0] if i < n_first else dropout[1])]
            n_in = int(width)
        return nn.Sequential(*layers), n_in

    class ConvTrunk(nn.Module):
        """Three conv blocks, then global average and max pooling concatenated."""

        def __init__(self) -> None:
            super().__init__()
            c1, c2, c3 = _CNN_CHANNELS
            self.features = nn.Sequential(
                nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(),
            )
            self.out_features = 2 * c3

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            h = self.features(images)
            return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)

    class LogisticModel(nn.Module):
        """Logistic regression: one linear layer to a logit."""

        kind = "logistic"

        def __init__(self, n_features: int, n_covariates: int = 0) -> None:
            super().__init__()
            self.linear = nn.Linear(n_features + n_covariates, 1)

        def forward(self, x=None, images=None, image_mask=None, omics=None, omics_mask=None, covariates=None):
            if covariates is not None:  # sparse covariates (issue 13b), densified per batch
                x = torch.cat([x, covariates], dim=1)
            return self.linear(x).squeeze(-1)

    class MLPModel(nn.Module):
        """Dense ReLU blocks with dropout, then a linear layer to a logit."""

        kind = "mlp"

        def __init__(self, n_features: int, hidden: Sequence[int], dropout: tuple[float, float]) -> None:
            super().__init__()
            self.trunk, width = dense(n_features, hidden, dropout)
            self.out = nn.Linear(width, 1)

        def forward(self, x=None, images=None, image_mask=None, omics=None, omics_mask=None):
            return self.out(self.trunk(x)).squeeze(-1)

    class CNNModel(nn.Module):
        """Small CNN on single-channel slices."""

        kind = "cnn"

        def __init__(self) -> None:
            super().__init__()
            self.trunk = ConvTrunk()
            self.out = nn.Linear(self.trunk.out_features, 1)

        def forward(self, x=None, images=None, image_mask=None, omics=None, omics_mask=None):
            if images is None:
                raise ValueError("the cnn model needs images (the site's dataset has none)")
            return self.out(self.trunk(images)).squeeze(-1)

    class FusionModel(nn.Module):
        """Tabular MLP + CNN (+ omics MLP) embeddings, masked per modality, concatenated -> logit."""

        kind = "fusion"

        def __init__(self, n_features: int, n_genes: int, hidden: Sequence[int],
                     dropout: tuple[float, float]) -> None:
            super().__init__()
            self.tabular, d_tab = dense(n_features, hidden, dropout)
            self.image = ConvTrunk()
            width = d_tab + self.image.out_features + 1
            self.n_genes = n_genes
            self.omics: nn.Module | None = None
            if n_genes > 0:
                self.omics, d_omics = dense(n_genes, _OMICS_HIDDEN, dropout)
                width += d_omics + 1
            self.head = nn.Sequential(nn.Linear(width, _HEAD_WIDTH), nn.ReLU(), nn.Dropout(dropout[1]),
                                      nn.Linear(_HEAD_WIDTH, 1))

        @staticmethod
        def _branch(branch: nn.Module, inputs, mask, n: int, width: int, like: torch.Tensor) -> list[torch.Tensor]:
            if inputs is None:  # the site has no such modality at all
                return [like.new_zeros((n, width)), like.new_zeros((n, 1))]
            m = like.new_ones(n) if mask is None else mask.to(like.dtype)
            return [branch(inputs) * m[:, None], m[:, None]]

        def forward(self, x=None, images=None, image_mask=None, omics=None, omics_mask=None):
            n = x.shape[0]
            parts = [self.tabular(x)]
            parts += self._branch(self.image, images, image_mask, n, self.image.out_features, x)
            if self.omics is not None:
                parts += self._branch(self.omics, omics, omics_mask, n, _OMICS_HIDDEN[-1], x)
            return self.head(torch.cat(parts, dim=1)).squeeze(-1)

    class DenseNet121Model(nn.Module):
        """DenseNet-121 (Huang et al. 2017) on single-channel slices, one logit out.

        The network is MONAI's ``DenseNet121`` (2-D, growth rate 32, blocks 6-12-24-16, batch
        normalisation), the architecture of the imaging seed paper; omopfl adds only the logit squeeze.
        """

        kind = "densenet121"

        def __init__(self) -> None:
            super().__init__()
            from monai.networks.nets import DenseNet121

            self.net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=1)

        def forward(self, x=None, images=None, image_mask=None, omics=None, omics_mask=None):
            if images is None:
                raise ValueError("the densenet121 model needs images (the site's dataset has none)")
            return self.net(images).squeeze(-1)

    classes = {"LogisticModel": LogisticModel, "MLPModel": MLPModel, "CNNModel": CNNModel,
               "FusionModel": FusionModel, "DenseNet121Model": DenseNet121Model, "ConvTrunk": ConvTrunk}
    for name, cls in classes.items():  # pickle finds them through the module's __getattr__
        cls.__module__ = __name__
        cls.__qualname__ = name
    return classes


def __getattr__(name: str) -> Any:
    if name in (*_CLASS_NAMES, "ConvTrunk"):
        return _classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def min_image_size(kind: str) -> int:
    """Smallest image side the image model ``kind`` accepts."""
    return _MIN_DENSENET_SIZE if kind == "densenet121" else _MIN_IMAGE_SIZE


def build_model(spec: ModelSpec, n_features: int, n_genes: int = 0, image_size: int = 0, *,
                seed: int = 0, n_covariates: int = 0) -> torch.nn.Module:
    """A freshly initialized model of ``spec.kind`` (same ``seed``, same weights).

    Parameters
    ----------
    spec:
        The study's model spec (``kind``, ``hidden`` widths, ``dropout`` rates).
    n_features:
        Tabular inputs (``len(scaler.feature_names)``); at least 1 except for ``cnn``.
    n_genes:
        Omics inputs for ``fusion`` (0: no omics branch).
    image_size:
        Side of the square image input for ``cnn``, ``fusion`` (at least 4) and ``densenet121``
        (at least 32).
    n_covariates:
        Sparse covariates (a study's ``[covariates]`` list) after the tabular inputs; ``logistic`` only.

    Raises
    ------
    ValueError
        Unknown kind or input sizes the kind cannot use.
    """
    import torch

    kind = spec.kind
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {', '.join(MODEL_KINDS)}")
    if kind not in ("cnn", "densenet121") and n_features < 1:
        raise ValueError(f"the {kind} model needs at least one tabular feature")
    if kind in IMAGE_KINDS and image_size < min_image_size(kind):
        raise ValueError(f"the {kind} model needs image_size >= {min_image_size(kind)}")
    if n_genes < 0:
        raise ValueError("n_genes must be >= 0")
    if n_covariates < 0 or (n_covariates and kind != "logistic"):
        raise ValueError("covariates need the logistic model (and n_covariates >= 0)")
    hidden = tuple(int(h) for h in spec.hidden)
    if any(h < 1 for h in hidden):
        raise ValueError("model hidden widths must be positive")
    dropout = _dropouts(spec.dropout)
    classes = _classes()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "logistic":
            model = classes["LogisticModel"](n_features, int(n_covariates))
        elif kind == "mlp":
            model = classes["MLPModel"](n_features, hidden, dropout)
        elif kind == "cnn":
            model = classes["CNNModel"]()
        elif kind == "densenet121":
            model = classes["DenseNet121Model"]()
        else:
            model = classes["FusionModel"](n_features, n_genes, hidden, dropout)
    return model.eval()


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


@dataclass
class SiteTensors:
    """A site's model inputs as float32 tensors, one row per person.

    Attributes
    ----------
    x:
        ``(n, features)`` imputed and standardized tabular features.
    y:
        ``(n,)`` labels 0.0/1.0.
    feature_names:
        Tabular column names (the scaler's).
    images, image_mask:
        ``(n, 1, s, s)`` pixels and ``(n,)`` 0/1 mask, or None when the site has no images.
    omics, omics_mask:
        ``(n, genes)`` standardized omics and ``(n,)`` 0/1 mask, or None.
    """

    x: torch.Tensor
    y: torch.Tensor
    feature_names: list[str] = field(default_factory=list)
    images: torch.Tensor | None = None
    image_mask: torch.Tensor | None = None
    omics: torch.Tensor | None = None
    omics_mask: torch.Tensor | None = None
    covariates: Any = None  # scipy.sparse CSR (n, covariates), densified one batch at a time (issue 13b)

    @property
    def n_covariates(self) -> int:
        return 0 if self.covariates is None else int(self.covariates.shape[1])

    @property
    def n(self) -> int:
        return int(self.y.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.x.shape[1])

    @property
    def n_genes(self) -> int:
        return 0 if self.omics is None else int(self.omics.shape[1])

    @property
    def image_size(self) -> int:
        return 0 if self.images is None else int(self.images.shape[-1])

    def batch(self, idx: Any) -> dict[str, torch.Tensor | None]:
        """Model keyword inputs for the rows ``idx`` (an index array or tensor)."""
        import torch

        rows = torch.as_tensor(np.asarray(idx, dtype=np.int64)) if not isinstance(idx, torch.Tensor) else idx

        def take(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.index_select(0, rows)

        out = {"x": take(self.x), "images": take(self.images), "image_mask": take(self.image_mask),
               "omics": take(self.omics), "omics_mask": take(self.omics_mask)}
        if self.covariates is not None:  # only this batch's rows become dense: memory ~ batch x covariates
            out["covariates"] = torch.from_numpy(
                self.covariates[rows.numpy()].toarray().astype(np.float32, copy=False))
        return out

    @classmethod
    def from_prepared(
        cls,
        prepared: PreparedSite,
        scaler: Scaler | Any,
        *,
        image_size: int | None = None,
        omics_scaler: Scaler | None = None,
        omics_log1p: bool = True,
    ) -> SiteTensors:
        """Model inputs from a prepared dataset and the global scaler (rules in the module docstring).

        Parameters
        ----------
        prepared:
            The site's :class:`omopfl.prepare.PreparedSite`.
        scaler:
            The global :class:`omopfl.moments.Scaler` (or an object with a ``.scaler`` attribute such
            as the federation's ``GlobalScaler``); its feature names must equal the dataset's.
        image_size:
            Resize images to this side (default: as prepared).
        omics_scaler:
            Per-gene standardization of the log1p values (default: the local fallback).
        omics_log1p:
            Apply ``log1p(max(v, 0))`` to omics values first (the study's ``[linking.omics] log1p``).

        Raises
        ------
        ValueError
            Feature names differ from the scaler's, infinite values, labels other than 0/1, or
            arrays whose row counts disagree.
        """
        import torch

        scaler = getattr(scaler, "scaler", scaler)
        names = [str(n) for n in prepared.feature_names]
        if list(scaler.feature_names) != names:
            raise ValueError("the scaler's feature names differ from the dataset's")
        x = np.asarray(prepared.x, dtype=np.float64)
        y = np.asarray(prepared.y, dtype=np.float64).reshape(-1)
        n = y.shape[0]
        if x.ndim != 2 or x.shape != (n, len(names)):
            raise ValueError(f"x must have shape ({n}, {len(names)})")
        if np.isinf(x).any():
            raise ValueError("x holds infinite values")
        if not np.isin(y, (0.0, 1.0)).all():
            raise ValueError("labels must be 0 or 1")
        mean = np.asarray(scaler.mean, dtype=np.float64)
        filled = np.where(np.isnan(x), mean, x)  # impute with the global means ...
        z = scaler.transform(filled)  # ... then a missing value standardizes to exactly 0
        out = cls(torch.from_numpy(z.astype(np.float32)), torch.from_numpy(y.astype(np.float32)), names)
        if prepared.images is not None:
            out.images, out.image_mask = _image_tensors(prepared.images, prepared.image_mask, n, image_size)
        if prepared.omics is not None:
            genes = list(getattr(prepared, "gene_names", []) or [])
            out.omics, out.omics_mask = _omics_tensors(prepared.omics, n, genes, omics_scaler, omics_log1p)
        return out


def _image_tensors(images: Any, mask: Any, n: int, size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    pixels = np.array(images, dtype=np.float32)  # a copy (prepared images may be a read-only memmap)
    if pixels.ndim != 3 or pixels.shape[0] != n or pixels.shape[1] != pixels.shape[2]:
        raise ValueError(f"images must have shape ({n}, size, size)")
    m = np.ones(n, dtype=bool) if mask is None else np.asarray(mask, dtype=bool).reshape(-1)
    if m.shape != (n,):
        raise ValueError(f"image_mask must have {n} entries")
    pixels[~np.isfinite(pixels)] = 0.0
    pixels[~m] = 0.0
    t = torch.from_numpy(pixels).unsqueeze(1)
    if size is not None and size != t.shape[-1]:
        if size < _MIN_IMAGE_SIZE:
            raise ValueError(f"image_size must be >= {_MIN_IMAGE_SIZE}")
        if size < t.shape[-1]:
            t = torch.nn.functional.interpolate(t, size=(size, size), mode="area")
        else:
            t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return t.contiguous(), torch.from_numpy(m.astype(np.float32))


def _omics_tensors(omics: Any, n: int, genes: list[str], scaler: Scaler | None,
                   log1p: bool) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    values = np.array(omics, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] != n:
        raise ValueError(f"omics must have shape ({n}, genes)")
    values[~np.isfinite(values)] = np.nan
    if log1p:
        values = np.log1p(np.maximum(values, 0.0))
    observed = ~np.isnan(values)
    if scaler is not None:
        scaler = getattr(scaler, "scaler", scaler)
        if len(scaler.feature_names) != values.shape[1] or (genes and list(scaler.feature_names) != genes):
            raise ValueError("the omics scaler's genes differ from the dataset's")
        z = scaler.transform(values)
    else:  # local fallback: this site's per-gene mean and sample standard deviation
        count = observed.sum(axis=0)
        total = np.where(observed, values, 0.0).sum(axis=0)
        mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
        d = np.where(observed, values - mean, 0.0)
        var = np.divide((d * d).sum(axis=0), count - 1, out=np.zeros_like(total), where=count > 1)
        std = np.sqrt(var)
        scale = np.where(std > 1e-12 * np.maximum(1.0, np.abs(mean)), std, 1.0)
        z = (values - mean) / scale
    z = np.where(observed, z, 0.0)
    mask = observed.any(axis=1)
    return torch.from_numpy(z.astype(np.float32)), torch.from_numpy(mask.astype(np.float32))


def split(n: int, test_fraction: float, seed: int, y: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/test row indices (sorted int64 arrays).

    With labels ``y`` holding both classes, the split is stratified: each class puts
    ``round(test_fraction * count)`` of its rows in the test set, at least one and at most all but
    one when it has two or more rows (and ``test_fraction > 0``).  Without labels, or with one
    class, ``round(test_fraction * n)`` random rows.  The same ``(n, test_fraction, seed, y)``
    always gives the same split.
    """
    if isinstance(n, bool) or int(n) != n or n < 0:
        raise ValueError("n must be a non-negative integer")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError("test_fraction must be in [0, 1)")
    n = int(n)
    rng = np.random.default_rng(seed)
    groups: list[np.ndarray] = [np.arange(n)]
    if y is not None:
        labels = np.asarray(y).reshape(-1)
        if labels.shape[0] != n:
            raise ValueError(f"y must have {n} entries")
        classes = np.unique(labels)
        if classes.size > 1:
            groups = [np.flatnonzero(labels == c) for c in classes]
    test: list[np.ndarray] = []
    for rows in groups:
        k = round(test_fraction * rows.size)
        if test_fraction > 0 and rows.size >= 2:
            k = min(max(k, 1), rows.size - 1)
        test.append(rng.permutation(rows)[:k])
    test_idx = np.sort(np.concatenate(test)).astype(np.int64) if test else np.zeros(0, np.int64)
    train_idx = np.setdiff1d(np.arange(n, dtype=np.int64), test_idx)
    return train_idx, test_idx


# --------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------


def get_weights(model: torch.nn.Module) -> list[np.ndarray]:
    """The model's state (parameters and buffers) as numpy copies, in ``state_dict`` order."""
    return [t.detach().cpu().numpy().copy() for t in model.state_dict().values()]


def set_weights(model: torch.nn.Module, weights: Sequence[Any]) -> None:
    """Load arrays from :func:`get_weights` (same order); ``ValueError`` on a count or shape mismatch."""
    import torch

    state = model.state_dict()
    if len(weights) != len(state):
        raise ValueError(f"expected {len(state)} weight arrays, got {len(weights)}")
    new = {}
    for (name, current), w in zip(state.items(), weights, strict=True):
        value = torch.as_tensor(np.asarray(w)).to(dtype=current.dtype)
        if tuple(value.shape) != tuple(current.shape):
            raise ValueError(f"weight {name}: shape {tuple(value.shape)}, expected {tuple(current.shape)}")
        new[name] = value
    model.load_state_dict(new, strict=True)


def _proximal_targets(model: torch.nn.Module, global_params: Sequence[Any] | None) -> list[tuple[Any, Any]]:
    """(parameter, global value) pairs for the FedProx term."""
    import torch

    params = dict(model.named_parameters())
    if global_params is None:
        return [(p, p.detach().clone()) for p in params.values() if p.requires_grad]
    names = list(model.state_dict().keys())
    if len(global_params) != len(names):
        raise ValueError(f"global_params: expected {len(names)} arrays, got {len(global_params)}")
    pairs = []
    for name, g in zip(names, global_params, strict=True):
        p = params.get(name)
        if p is None or not p.requires_grad:
            continue
        target = torch.as_tensor(np.asarray(g) if not isinstance(g, torch.Tensor) else g.detach())
        target = target.to(dtype=p.dtype).clone()
        if target.shape != p.shape:
            raise ValueError(f"global_params {name}: shape {tuple(target.shape)}, expected {tuple(p.shape)}")
        pairs.append((p, target))
    return pairs


def _proximal(pairs: list[tuple[Any, Any]], mu: float) -> Any:
    total = sum(((p - g) ** 2).sum() for p, g in pairs)
    return 0.5 * mu * total


# --------------------------------------------------------------------------------------------
# training and evaluation
# --------------------------------------------------------------------------------------------


def _rows(idx: Any, n: int) -> np.ndarray:
    rows = np.asarray(idx, dtype=np.int64).reshape(-1)
    if rows.size and (rows.min() < 0 or rows.max() >= n):
        raise ValueError(f"row indices must be in [0, {n})")
    return rows


def train_local(
    model: torch.nn.Module,
    tensors: SiteTensors,
    idx: Any,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    proximal_mu: float = 0.0,
    global_params: Sequence[Any] | None = None,
    seed: int = 0,
    optimizer: str = "adam",
    l2: float = 0.0,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    steps: int = 0,
    correction: Sequence[Any] | None = None,
) -> dict[str, float | int]:
    """Train in place on the rows ``idx`` (rules in the module docstring).

    Parameters
    ----------
    optimizer, momentum, weight_decay:
        ``"adam"`` (torch's Adam, ``weight_decay`` its L2 term) or ``"sgd"`` (torch's SGD with
        ``momentum`` and ``weight_decay``; ``momentum`` is ignored by Adam).
    steps:
        > 0: exactly that many minibatch steps (epochs reshuffled as often as needed; ``epochs`` is
        then ignored), so a small site takes as many steps as a big one.
    correction:
        SCAFFOLD's ``c - c_i`` per trainable parameter (in ``model.parameters()`` order), added to
        every gradient before the optimizer step.

    Returns
    -------
    dict
        ``loss``: mean BCE over the last epoch's batches (without the proximal term; NaN if
        nothing was trained); ``n``: rows trained on (the FedAvg weight); ``steps``: optimizer
        steps taken.
    """
    import torch

    if isinstance(epochs, bool) or int(epochs) != epochs or epochs < 0:
        raise ValueError("epochs must be a non-negative integer")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError("batch_size must be a positive integer")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError("lr must be a positive number")
    if not (math.isfinite(proximal_mu) and proximal_mu >= 0):
        raise ValueError("proximal_mu must be >= 0")
    if optimizer not in ("adam", "sgd"):
        raise ValueError("optimizer must be 'adam' or 'sgd'")
    if not (math.isfinite(l2) and l2 >= 0):
        raise ValueError("l2 must be >= 0")
    if not (math.isfinite(momentum) and 0 <= momentum < 1) or not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError("momentum must be in [0, 1) and weight_decay >= 0")
    if isinstance(steps, bool) or int(steps) != steps or steps < 0:
        raise ValueError("steps must be a non-negative integer")
    rows = _rows(idx, tensors.n)
    if rows.size == 0 or (epochs == 0 and not steps):
        model.eval()
        return {"loss": math.nan, "n": int(rows.size), "steps": 0}
    pairs = _proximal_targets(model, global_params) if proximal_mu > 0 else []
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.Adam(params, lr=lr, weight_decay=weight_decay) if optimizer == "adam"
           else torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay))
    shifts = None
    if correction is not None:
        shifts = [torch.as_tensor(np.asarray(c)) for c in correction]
        if len(shifts) != len(params) or any(c.shape != p.shape for c, p in zip(shifts, params, strict=True)):
            raise ValueError("correction must hold one array per trainable parameter, of its shape")
        shifts = [c.to(dtype=p.dtype) for c, p in zip(shifts, params, strict=True)]
    loss_fn = torch.nn.BCEWithLogitsLoss()
    order_source = torch.as_tensor(rows)
    last = math.nan
    taken = 0
    batch = int(batch_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        model.train()
        for _ in itertools.count() if steps else range(int(epochs)):  # with steps: epochs until they are taken
            if steps and taken >= steps:
                break
            order = order_source[torch.randperm(rows.size, generator=generator)]
            total, seen = 0.0, 0
            for start in range(0, rows.size, batch):
                if steps and taken >= steps:
                    break
                b = order[start:start + batch]
                logits = model(**tensors.batch(b))
                bce = loss_fn(logits, tensors.y.index_select(0, b))
                loss = (bce + _proximal(pairs, proximal_mu)) if pairs else bce
                if l2 > 0:  # L2-regularized ([model] l2): l2 / 2 * ||w||^2 over weights, not biases
                    loss = loss + 0.5 * l2 * sum((p * p).sum() for name, p in model.named_parameters()
                                                 if name.endswith("weight"))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if shifts is not None:
                    with torch.no_grad():
                        for p, c in zip(params, shifts, strict=True):
                            p.grad.add_(c)
                opt.step()
                taken += 1
                total += float(bce.detach()) * int(b.numel())
                seen += int(b.numel())
            last = total / max(1, seen)
        model.eval()
    return {"loss": last, "n": int(rows.size), "steps": taken}


def _logits(model: torch.nn.Module, tensors: SiteTensors, rows: np.ndarray, batch_size: int) -> torch.Tensor:
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, rows.size, batch_size):
            out.append(model(**tensors.batch(rows[start:start + batch_size])))
    return torch.cat(out) if out else torch.zeros(0)


def predict_proba(model: torch.nn.Module, tensors: SiteTensors, idx: Any, *, batch_size: int = 1024) -> np.ndarray:
    """Predicted probabilities (float64) for the rows ``idx``, in eval mode (no dropout)."""
    import torch

    return torch.sigmoid(_logits(model, tensors, _rows(idx, tensors.n), batch_size)).double().numpy()


def local_loss(model: torch.nn.Module, tensors: SiteTensors, idx: Any, *, proximal_mu: float = 0.0,
               global_params: Sequence[Any] | None = None, batch_size: int = 1024) -> float:
    """The training objective on ``idx`` in eval mode: mean BCE + ``mu / 2 * ||w - w_global||^2``.

    ``global_params`` defaults to the model's own weights (a zero proximal term).
    """
    import torch

    rows = _rows(idx, tensors.n)
    if rows.size == 0:
        return math.nan
    logits = _logits(model, tensors, rows, batch_size).double()
    y = tensors.y.index_select(0, torch.as_tensor(rows)).double()
    value = float(torch.nn.functional.binary_cross_entropy_with_logits(logits, y))
    if proximal_mu > 0:
        with torch.no_grad():
            value += float(_proximal(_proximal_targets(model, global_params), proximal_mu))
    return value


def evaluate(model: torch.nn.Module, tensors: SiteTensors, idx: Any, *, batch_size: int = 1024) -> dict[str, float]:
    """``loss`` (mean BCE), ``auc``, ``accuracy``, ``f1``, ``kappa`` (threshold 0.5) and ``n`` on ``idx``."""
    import torch

    rows = _rows(idx, tensors.n)
    if rows.size == 0:
        return {"loss": math.nan, **binary_metrics([], [])}
    logits = _logits(model, tensors, rows, batch_size).double()
    y = tensors.y.index_select(0, torch.as_tensor(rows)).double()
    loss = float(torch.nn.functional.binary_cross_entropy_with_logits(logits, y))
    return {"loss": loss, **binary_metrics(y.numpy(), torch.sigmoid(logits).numpy())}


def binary_metrics(y_true: Any, y_prob: Any, threshold: float = 0.5) -> dict[str, float]:
    """``auc``, ``accuracy``, ``f1``, ``kappa`` and ``n`` with scikit-learn's definitions.

    A person is predicted positive when ``y_prob >= threshold``.  AUC is NaN when only one class
    is present, kappa NaN when it is undefined (labels and predictions all one same class), F1 is
    0 when there is no positive label or prediction; every metric is NaN for no rows.
    """
    y = np.asarray(y_true, dtype=np.float64).reshape(-1)
    p = np.asarray(y_prob, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError("y_true and y_prob must have the same length")
    n = int(y.size)
    if n == 0:
        return {"auc": math.nan, "accuracy": math.nan, "f1": math.nan, "kappa": math.nan, "n": 0}
    from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score, roc_auc_score

    labels = (y >= 0.5).astype(np.int64)
    predicted = (p >= threshold).astype(np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auc = float(roc_auc_score(labels, p)) if np.unique(labels).size == 2 else math.nan
        kappa = float(cohen_kappa_score(labels, predicted))
    return {
        "auc": auc,
        "accuracy": float(accuracy_score(labels, predicted)),
        "f1": float(f1_score(labels, predicted, zero_division=0.0)),
        "kappa": kappa if math.isfinite(kappa) else math.nan,
        "n": n,
    }


def weighted_average(metrics: Sequence[tuple[int, Mapping[str, Any]]]) -> dict[str, float]:
    """Combine per-site metrics weighted by each site's ``n`` (federated evaluation).

    Every numeric key other than ``n`` is averaged over the sites where it is finite (a site
    whose AUC is NaN, one class only, does not count for ``auc``); a key finite nowhere is NaN.
    ``n`` in the result is the total over sites with ``n > 0``.
    """
    keys: list[str] = []
    for _, m in metrics:
        keys += [k for k in m if k != "n" and k not in keys]
    out: dict[str, float] = {}
    for key in keys:
        num = den = 0.0
        for n, m in metrics:
            v = m.get(key)
            if n > 0 and isinstance(v, int | float | np.number) and not isinstance(v, bool) and math.isfinite(v):
                num += float(n) * float(v)
                den += float(n)
        out[key] = num / den if den > 0 else math.nan
    out["n"] = int(sum(n for n, _ in metrics if n > 0))
    return out
