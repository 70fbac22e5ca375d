"""Pooled (centralized) baseline: the study's model trained on all sites' rows in one place.

Pooling rows defeats the point of federation, so it is allowed only on synthetic and test data:
every site's CDM must say so in ``cdm_source`` (``cdm_source_name`` or ``source_description``
mentioning one of :data:`POOLABLE_MARKERS`, as :mod:`omopfl.synth` and Eunomia's Synthea data do);
otherwise :func:`train_pooled` raises :class:`omopfl.errors.ConfigError` before loading any rows.

What matches the federated run (:func:`omopfl.federation.local.run_training`)
    * the scaler rule: :meth:`omopfl.moments.Scaler.from_moments` of the moments
      (:meth:`omopfl.moments.Moments.from_array`) of the *pooled* ``x``;
    * the per-site train/test split: ``split(n, test_fraction, seed, y)`` on each site with the
      study's ``[training] test_fraction`` and ``seed``, exactly as the sites do;
    * the model: ``build_model(spec.model, n_features, seed=seed)``; ``batch_size``,
      ``learning_rate``; ``rounds * local_epochs`` epochs in all (``rounds`` overrides the study's).

Metrics
    ``pooled``: one evaluation over the concatenated test rows (one AUC of all predictions);
    ``site_weighted``: the n-weighted mean of the per-site test evaluations, comparable to the
    federated ``final`` ``eval_*`` metrics; ``sites``: each site's evaluation.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["POOLABLE_MARKERS", "POOLED_FILE", "check_poolable", "train_pooled"]

POOLED_FILE = "pooled.json"
POOLABLE_MARKERS = ("synthetic", "synthea", "eunomia", "synpuf", "omopfl test")
"""Case-insensitive words of ``cdm_source`` that mark a CDM whose rows may be pooled."""


def check_poolable(site: Any) -> str:
    """The site's ``cdm_source_name`` if its CDM is synthetic/test data, else ``ConfigError``."""
    import sqlalchemy as sa

    from omopfl.db import make_engine, qualified, sql_text
    from omopfl.errors import ConfigError

    engine = make_engine(site.database_url())
    try:
        with engine.connect() as conn:
            try:
                row = conn.execute(sa.text(
                    sql_text("cdm_source_description", cdm_source=qualified(site.cdm_schema, "cdm_source"))
                )).first()
            except sa.exc.DBAPIError:
                row = None
    finally:
        engine.dispose()
    text = " ".join(str(v) for v in (row or ()) if v is not None)
    if not any(marker in text.lower() for marker in POOLABLE_MARKERS):
        raise ConfigError(f"site {site.name}: pooling rows is allowed only on synthetic or test data "
                          "(cdm_source does not mark this CDM as such)")
    return str(row[0]) if row and row[0] is not None else ""


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float | np.number) and math.isfinite(float(value)) else None


def _clean(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (int(v) if k == "n" else _finite(v)) for k, v in metrics.items()}


def _concat(parts: list[Any]) -> Any:
    """One SiteTensors holding the given (tensors, rows) parts, in order."""
    import torch

    from omopfl.models import SiteTensors

    def cat(name: str) -> torch.Tensor | None:
        values = [getattr(t, name) for t, _ in parts]
        if all(v is None for v in values):
            return None
        if any(v is None for v in values):
            raise ValueError(f"some sites have {name} and others do not: cannot pool")
        return torch.cat([v.index_select(0, torch.as_tensor(rows)) for v, (_, rows) in zip(values, parts, strict=True)])

    out = SiteTensors(cat("x"), cat("y"), list(parts[0][0].feature_names))  # type: ignore[arg-type]
    out.images, out.image_mask = cat("images"), cat("image_mask")
    out.omics, out.omics_mask = cat("omics"), cat("omics_mask")
    return out


def train_pooled(study_path: str | Path, adapters: Sequence[str | Path], prepared_dir: str | Path, *,
                 out_dir: str | Path, rounds: int | None = None) -> dict[str, Any]:
    """Train the study's model on the pooled rows of every site (module docstring).

    Parameters
    ----------
    study_path:
        The study file (model and ``[training]`` spec).
    adapters:
        One adapter TOML per site; each site's CDM must be synthetic or test data.
    prepared_dir:
        Folder of the ``<site>/`` datasets written by ``omopfl prepare``.
    out_dir:
        Where ``pooled.json`` is written (created if needed).
    rounds:
        Overrides the study's ``[training] rounds`` (epochs = ``rounds * local_epochs``).

    Returns
    -------
    dict
        What ``<out_dir>/pooled.json`` holds: ``metrics`` (``pooled``, ``site_weighted``, ``sites``,
        ``train_loss``), ``config`` (model, training, sites, scaler) and ``seconds``.
    """
    from omopfl.config import load_site
    from omopfl.errors import ConfigError
    from omopfl.models import SiteTensors, build_model, evaluate, split, train_local, weighted_average
    from omopfl.moments import Moments, Scaler
    from omopfl.prepare import load_prepared
    from omopfl.study import load_study

    started = time.perf_counter()
    spec = load_study(study_path)
    t = spec.training
    n_rounds = int(rounds if rounds is not None else t.rounds)
    if n_rounds < 1:
        raise ConfigError("rounds must be >= 1")
    sites = [load_site(a) for a in adapters]
    if not sites:
        raise ConfigError("train_pooled needs at least one site adapter")
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise ConfigError("two adapters name the same site")
    sources = {site.name: check_poolable(site) for site in sites}

    prepared = [load_prepared(Path(prepared_dir) / name) for name in names]
    features = list(prepared[0].feature_names)
    for p in prepared:
        if list(p.feature_names) != features:
            raise ConfigError(f"site {p.site}: feature names differ from site {prepared[0].site}'s")
        if (p.manifest.get("dataset_hash", spec.dataset_hash) != spec.dataset_hash if "dataset_hash" in p.manifest
                else p.manifest.get("study_hash", spec.hash) != spec.hash):
            raise ConfigError(f"site {p.site}: prepared for another study (hash mismatch)")

    pooled_x = np.concatenate([np.asarray(p.x, dtype=np.float64) for p in prepared], axis=0)
    scaler = Scaler.from_moments(Moments.from_array(pooled_x, features))
    tensors = [SiteTensors.from_prepared(p, scaler) for p in prepared]
    from omopfl.splits import rows_from_mask

    splits = [rows_from_mask(p.test_mask) if spec.split.fixed and p.test_mask is not None
              else split(tt.n, float(t.test_fraction), int(t.seed), p.y)
              for tt, p in zip(tensors, prepared, strict=True)]
    train = _concat([(tt, tr) for tt, (tr, _) in zip(tensors, splits, strict=True)])
    test = _concat([(tt, te) for tt, (_, te) in zip(tensors, splits, strict=True)])

    model = build_model(spec.model, tensors[0].n_features, tensors[0].n_genes, tensors[0].image_size,
                        seed=int(t.seed))
    epochs = n_rounds * int(t.local_epochs)
    t0 = time.perf_counter()
    # the study's local optimizer; with local_steps, the global model's steps (rounds * local_steps)
    stats = train_local(model, train, np.arange(train.n), epochs=epochs, batch_size=int(t.batch_size),
                        lr=float(t.learning_rate), seed=int(t.seed), optimizer=t.optimizer, momentum=t.momentum,
                        weight_decay=t.weight_decay, steps=n_rounds * int(t.local_steps))
    train_seconds = time.perf_counter() - t0

    per_site = {name: evaluate(model, tt, te) for name, tt, (_, te) in zip(names, tensors, splits, strict=True)}
    weighted = weighted_average([(int(splits[i][1].size), per_site[name]) for i, name in enumerate(names)])
    result = {
        "version": 1,
        "kind": "pooled",
        "study_name": spec.name,
        "study_hash": spec.hash,
        "metrics": {
            "pooled": _clean(evaluate(model, test, np.arange(test.n))),
            "site_weighted": _clean(weighted),
            "sites": {name: _clean(m) for name, m in per_site.items()},
            "train_loss": _finite(stats["loss"]),
            "train_n": int(stats["n"]),
        },
        "config": {
            "model": {"kind": spec.model.kind, "hidden": list(spec.model.hidden), "dropout": list(spec.model.dropout),
                      "n_features": len(features)},
            "training": {"rounds": n_rounds, "local_epochs": int(t.local_epochs), "epochs": epochs,
                         "batch_size": int(t.batch_size), "learning_rate": float(t.learning_rate),
                         "test_fraction": float(t.test_fraction), "seed": int(t.seed),
                         "optimizer": t.optimizer, "momentum": float(t.momentum),
                         "weight_decay": float(t.weight_decay), "steps": int(stats.get("steps", 0))},
            "sites": names,
            "cdm_sources": sources,
            "rows": {name: {"train": int(tr.size), "test": int(te.size)}
                     for name, (tr, te) in zip(names, splits, strict=True)},
            "scaler": scaler.to_dict(),
        },
        "seconds": {"training": round(train_seconds, 3), "total": round(time.perf_counter() - started, 3)},
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / POOLED_FILE).write_text(json.dumps(result, indent=2, sort_keys=True))
    return result
