"""Admission at the site's trust boundary: which site, which study, which settings.

A message names a study (:func:`requested_study`, the message's own claim); the site serves it only for an
active approval of that hash and a dataset prepared for it (:func:`prepared_for`), and only with settings
equal to the approved study's and within its policy (:func:`admit_training`, :func:`admit_stats`): what the
handlers then get is the approved study's settings, never the message's.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from omopfl import budget, policy
from omopfl.config import SiteConfig, load_site
from omopfl.errors import Refusal, SiteFailure
from omopfl.federation import codec
from omopfl.federation.site.audit_trail import sent_replies

__all__ = ["node_site", "requested_study", "same_setting", "prepared_manifest", "prepared_for", "admit_training",
           "scaffold_records", "scaffold_state", "study_privacy", "study_ledger", "admit_stats", "indicator_bounds"]

_log = logging.getLogger("omopfl.site")


def node_site(context: Context) -> SiteConfig:
    adapter = context.node_config.get("site-config")
    if not isinstance(adapter, str) or not adapter:
        raise SiteFailure("config")
    return load_site(adapter)


def requested_study(message_type: str, content: RecordDict) -> str:
    """The study hash the message says it is for (the message's own claim, checked next)."""
    if message_type == "query.stats":
        return codec.decode_stats_request(content).study_hash
    if message_type == "query.scaler":
        return codec.decode_scaler(content).study_hash
    if message_type == codec.COVARIATES_QUERY:
        return codec.decode_covariates_request(content).study_hash
    if message_type == "query.secagg":
        from omopfl.federation import codec_secure_statistics as secure_stats

        return secure_stats.decode_request(content).study_hash
    if message_type == "query.validate":
        from omopfl.federation.codec_validation import decode_request

        return decode_request(content).study_hash
    config = content.config_records.get(codec.TRAIN_CONFIG)
    value = None if config is None else config.get(codec.STUDY_HASH_KEY)
    if not isinstance(value, str):
        raise codec.CodecError(f"config key {codec.STUDY_HASH_KEY!r} is missing")
    return value


def same_setting(sent: Any, approved: Any) -> bool:
    if isinstance(approved, bool) or isinstance(sent, bool):
        return type(sent) is type(approved) and sent == approved
    if isinstance(approved, int | float) and isinstance(sent, int | float):
        return float(sent) == float(approved)
    return type(sent) is type(approved) and sent == approved


def prepared_manifest(context: Context, site: SiteConfig) -> dict[str, Any]:
    folder = Path(str(context.node_config.get("prepared-dir", ""))) / site.name
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        raise SiteFailure("not_prepared") from None
    if not isinstance(manifest, dict):
        raise SiteFailure("not_prepared")
    return manifest


def prepared_for(context: Context, site: SiteConfig, approved: policy.ApprovedStudy) -> bool:
    """The site's prepared dataset is the approved study's: its DATASET hash equals the approved study's
    (:attr:`omopfl.study.StudyConfig.dataset_hash`), so a study that changed only training settings
    (model, training, privacy) is served without re-preparation once approved.  A dataset or an
    approval from before dataset hashes existed is compared by the whole study's hash."""
    manifest = prepared_manifest(context, site)
    approved_dataset = approved.summary.get("dataset_hash")
    if approved_dataset and manifest.get("dataset_hash"):
        return str(manifest["dataset_hash"]) == str(approved_dataset)
    return str(manifest.get("study_hash", "")) == approved.hash


def admit_training(message_type: str, content: RecordDict, context: Context, site: SiteConfig,
                    approved: policy.ApprovedStudy, run_id: int) -> RecordDict:
    """The content the handler gets: the message's weights with the approved study's settings."""
    config = dict(content.config_records[codec.TRAIN_CONFIG])
    settings = dict(approved.settings)
    for key, value in config.items():
        if key in codec.ROUND_KEYS:
            continue
        if key not in settings or not same_setting(value, settings[key]):
            _log.warning("omopfl site %s: %s refused: setting %s differs from the approved study", site.name,
                         message_type, key)
            raise Refusal("settings_mismatch")
    rules = site.policy
    dp_sgd = bool(study_privacy(approved).get("dp_sgd"))
    if settings["model-kind"] not in rules.allowed_models or (rules.dp_required and not dp_sgd):
        raise Refusal("policy")
    server_round = config.get("server-round", 1)
    if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 1:
        raise codec.CodecError("config key 'server-round' must be a positive integer")
    limit = min(int(settings["rounds"]), rules.max_rounds)
    evaluate_received = config.get("evaluate-received", False)
    if not isinstance(evaluate_received, bool):
        raise codec.CodecError("config key 'evaluate-received' must be a bool")
    if message_type == "train":
        if server_round > limit or sent_replies(site, run_id, "train") >= limit:
            raise Refusal("round_limit")
    elif not rules.release_metrics:
        raise Refusal("policy")
    elif server_round > limit or sent_replies(site, run_id, "evaluate") >= limit:  # bounded repeated evaluations
        raise Refusal("round_limit")
    effective = {key: value for key, value in settings.items() if key != "rounds"}
    privacy = study_privacy(approved)
    if privacy.get("dp_sgd"):  # the site's own DP-SGD settings, from the approved study (never the message)
        effective.update({"dp-sgd": True, "dp-target-epsilon": float(privacy["target_epsilon"]),
                          "dp-delta": float(privacy.get("delta") or 1e-6),
                          "dp-max-grad-norm": float(privacy.get("max_grad_norm") or 1.0),
                          "dp-rounds": int(settings["rounds"]), "dp-budget": float(privacy.get("budget_epsilon") or 0)})
    release_metrics = rules.release_metrics
    metrics_epsilon = privacy.get("metrics_epsilon")
    if metrics_epsilon is not None:  # DP on the released metrics (omopfl.dp_metrics), charged to the ledger
        ledger, budget_limit = study_ledger(site, approved)
        fits = ledger.fits(budget_limit, metrics=float(metrics_epsilon))
        if message_type == "evaluate" and not fits:
            raise Refusal("budget_spent")
        release_metrics = release_metrics and fits  # a train reply then carries no evaluation
        effective.update({"dp-metrics-epsilon": float(metrics_epsilon), "dp-delta": float(privacy.get("delta") or 1e-6),
                          "dp-budget": float(privacy.get("budget_epsilon") or 0)})
    elif rules.dp_required:  # metrics only with DP (an approval checks this too): none without it
        if message_type == "evaluate":
            raise Refusal("policy")
        release_metrics = False
    effective.update({"server-round": server_round, codec.STUDY_HASH_KEY: approved.hash,
                      "evaluate-received": bool(evaluate_received and release_metrics)})
    records: dict[str, Any] = {codec.TRAIN_CONFIG: ConfigRecord(effective)}
    if codec.TRAIN_ARRAYS in content.array_records:
        records[codec.TRAIN_ARRAYS] = content.array_records[codec.TRAIN_ARRAYS]
    if settings.get("strategy") == "scaffold" and message_type == "train":
        records.update(scaffold_records(content))
        # the site's own control variate c_i: its state folder, per study and run (never the message)
        effective["scaffold-state"] = str(scaffold_state(site, approved, run_id))
        records[codec.TRAIN_CONFIG] = ConfigRecord(effective)
    return RecordDict(records)


def scaffold_records(content: RecordDict) -> dict[str, Any]:
    """A SCAFFOLD train message's ArrayRecord split into the weights and the global control variate ``c``
    (``scaffold-c/<name>``; issue 14b); ``c`` must cover exactly the weights' floating-point arrays."""
    if codec.TRAIN_ARRAYS not in content.array_records:
        raise codec.CodecError("arrays record missing")
    record = content.array_records[codec.TRAIN_ARRAYS]
    prefix = codec.SCAFFOLD_C_PREFIX
    weights = {k: v for k, v in record.items() if not k.startswith(prefix)}
    control = {k[len(prefix):]: v for k, v in record.items() if k.startswith(prefix)}
    floating = {k for k, v in weights.items() if np.issubdtype(np.dtype(v.dtype), np.floating)}
    if set(control) != floating or any(tuple(control[k].shape) != tuple(weights[k].shape) for k in control):
        raise codec.CodecError("the SCAFFOLD control variate does not match the weights")
    return {codec.TRAIN_ARRAYS: ArrayRecord(weights), codec.SCAFFOLD_C: ArrayRecord(control)}


def scaffold_state(site: SiteConfig, approved: policy.ApprovedStudy, run_id: int) -> Path:
    return policy.state_dir(site) / "scaffold" / f"{approved.hash[:32]}-{int(run_id)}.npz"


def study_privacy(approved: policy.ApprovedStudy) -> dict[str, Any]:
    return dict(approved.summary.get("privacy") or {})


def study_ledger(site: SiteConfig, approved: policy.ApprovedStudy) -> tuple[budget.Ledger, float | None]:
    privacy = study_privacy(approved)
    ledger = budget.Ledger(policy.state_dir(site), approved.hash, float(privacy.get("delta") or 1e-6))
    return ledger, budget.limit(privacy.get("budget_epsilon"), site.policy.epsilon_budget)


def admit_stats(content: RecordDict, site: SiteConfig, approved: policy.ApprovedStudy) -> codec.DPRequest | None:
    """The DP the site applies to this statistics release: the approved study's, which the request must state."""
    request = codec.decode_stats_request(content)
    rules = site.policy
    privacy = study_privacy(approved)
    epsilon = privacy.get("statistics_epsilon")
    if epsilon is None:
        if request.dp is not None:
            raise Refusal("settings_mismatch")
        if rules.dp_required:
            raise Refusal("policy")
        return None
    bounds = {str(k): (float(v[0]), float(v[1])) for k, v in dict(privacy.get("bounds") or {}).items()}
    if (request.dp is None or not same_setting(request.dp.epsilon, epsilon)
            or not same_setting(request.dp.delta, privacy["delta"])
            or any(tuple(request.dp.bounds.get(name, ())) != pair for name, pair in bounds.items())):
        raise Refusal("settings_mismatch")
    if rules.max_epsilon is not None and float(epsilon) > rules.max_epsilon:
        raise Refusal("policy")
    ledger, limit = study_ledger(site, approved)
    if not ledger.fits(limit, statistics=float(epsilon)):
        raise Refusal("budget_spent")
    # missingness indicators are 0/1 by construction: the site bounds them itself
    return codec.DPRequest(float(epsilon), float(privacy["delta"]), {**indicator_bounds(approved), **bounds})


def indicator_bounds(approved: policy.ApprovedStudy) -> dict[str, tuple[float, float]]:
    return {f"{name}{codec.MISSING_SUFFIX}": (0.0, 1.0) for name in approved.summary.get("features", [])}
