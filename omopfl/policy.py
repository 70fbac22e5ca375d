"""What a site allows: its policy (from its own adapter) and the studies its data engineer approved.

The policy is the ``[policy]`` section of the site's adapter TOML, owned by the site and never
overridable by a coordinator::

    [site]
    name = "site_a"
    min_cell_count = 10              # the release rule's k (every number that leaves: >= k persons)

    [policy]
    allowed_models = ["logistic", "mlp"]   # model kinds the site trains (default: all omopfl's)
    max_rounds = 50                  # most training rounds per run (default 100)
    release_metrics = true           # whether evaluation metrics may leave (default true)
    dp_required = false              # statistics only with differential privacy (default false)
    secure_aggregation_required = false  # statistics only as masked sums (default false)
    max_epsilon = 1.0                # largest epsilon per statistics release the site accepts (optional)
    state_dir = "site_a-state"       # approvals and the audit log (default: omopfl-site-<name> beside the adapter)

Approvals live in the site's state folder: ``approvals.json`` (one entry per study hash: name,
when approved or revoked, the settings that decide what is computed, cohort hashes, the summary
that was shown) and ``studies/<hash>.toml`` (the exact bytes that were approved).  ``omopfl sites
approve | studies | revoke`` read and write them; the site's ClientApp
(:mod:`omopfl.federation.site.app`) reads them for every message.

Pure bookkeeping: no database, no Flower import here except the wire names of the training settings.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omopfl.atomic import write_bytes
from omopfl.errors import ConfigError
from omopfl.models import IMAGE_KINDS, MODEL_KINDS

if TYPE_CHECKING:
    from omopfl.config import SiteConfig
    from omopfl.study import StudyConfig

__all__ = ["SitePolicy", "ApprovedStudy", "parse_policy", "policy_problems", "study_summary", "approve", "revoke",
           "approved_studies", "approved_study", "state_dir", "MODEL_KINDS", "APPROVALS_FILE"]

APPROVALS_FILE = "approvals.json"
DEFAULT_MAX_ROUNDS = 100
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class SitePolicy:
    """The site's own rules (its adapter's ``[policy]``); see the module docstring."""

    allowed_models: tuple[str, ...] = MODEL_KINDS
    max_rounds: int = DEFAULT_MAX_ROUNDS
    release_metrics: bool = True
    dp_required: bool = False
    max_epsilon: float | None = None
    epsilon_budget: float | None = None
    state_dir: Path | None = None
    secure_aggregation_required: bool = False

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["allowed_models"] = list(self.allowed_models)
        data["state_dir"] = None if self.state_dir is None else str(self.state_dir)
        return data


def parse_policy(table: Any, path: Path, site_name: str) -> SitePolicy:
    """The ``[policy]`` section of an adapter (absent: the defaults), every key checked."""
    if table is None:
        table = {}
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [policy] must be a table")
    known = {"allowed_models", "max_rounds", "release_metrics", "dp_required", "max_epsilon", "epsilon_budget",
             "state_dir", "secure_aggregation_required"}
    for key in table:
        if key not in known:
            raise ConfigError(f"{path}: unknown key [policy] {key}; expected one of {sorted(known)}")
    models = table.get("allowed_models", list(MODEL_KINDS))
    if (not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models)
            or any(m not in MODEL_KINDS for m in models)):
        raise ConfigError(f"{path}: [policy] allowed_models must be a non-empty list of {', '.join(MODEL_KINDS)}")
    max_rounds = table.get("max_rounds", DEFAULT_MAX_ROUNDS)
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or not 1 <= max_rounds <= 100_000:
        raise ConfigError(f"{path}: [policy] max_rounds must be an integer from 1 to 100000")
    flags = {}
    for key, default in (("release_metrics", True), ("dp_required", False), ("secure_aggregation_required", False)):
        value = table.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: [policy] {key} must be true or false")
        flags[key] = value
    epsilons: dict[str, float | None] = {}
    for key in ("max_epsilon", "epsilon_budget"):
        value = table.get(key)
        if value is not None:
            if (isinstance(value, bool) or not isinstance(value, int | float)
                    or not math.isfinite(float(value)) or float(value) <= 0):
                raise ConfigError(f"{path}: [policy] {key} must be a positive finite number")
            value = float(value)
        epsilons[key] = value
    max_epsilon = epsilons["max_epsilon"]
    state = table.get("state_dir")
    if state is not None and (not isinstance(state, str) or not state.strip()):
        raise ConfigError(f"{path}: [policy] state_dir must be a folder path")
    base = path.parent
    folder = Path(os.path.expandvars(state)).expanduser() if state else Path(f"omopfl-site-{site_name}")
    folder = folder if folder.is_absolute() else base / folder
    return SitePolicy(allowed_models=tuple(models), max_rounds=max_rounds, release_metrics=flags["release_metrics"],
                      dp_required=flags["dp_required"], max_epsilon=max_epsilon,
                      epsilon_budget=epsilons["epsilon_budget"], state_dir=folder.resolve(),
                      secure_aggregation_required=flags["secure_aggregation_required"])


def state_dir(site: SiteConfig) -> Path:
    """The site's state folder (approvals, audit log)."""
    policy = site.policy
    if policy.state_dir is not None:
        return policy.state_dir
    base = site.source.parent if site.source is not None else Path.cwd()
    return (base / f"omopfl-site-{site.name}").resolve()


# --------------------------------------------------------------------------------------------
# what a study computes and what leaves
# --------------------------------------------------------------------------------------------


def _model_parameters(study: StudyConfig) -> int | None:
    """Number of weights of the study's model (what leaves per round), or None if it cannot be built here."""
    try:
        from omopfl.models import build_model

        n_features = len(study.feature_names()) + len(study.measurements)  # + missingness indicators (at most)
        genes = len(study.omics.genes) if study.omics.enabled and study.model.kind == "fusion" else 0
        size = int(study.imaging.size) if study.imaging.enabled and study.model.kind in IMAGE_KINDS else 0
        covariates = study.covariates
        n_cov = len(covariates.covariate_ids) if covariates is not None and covariates.covariate_ids else 0
        model = build_model(study.model, n_features, genes, size, n_covariates=n_cov)
        return int(sum(p.numel() for p in model.parameters()))
    except Exception:  # a summary, not a check: the study is still shown
        return None


def _cohort_summary(study: StudyConfig, role: str) -> dict[str, Any]:
    """What the data engineer approves of one cohort: its definition file and hash, or the site's id."""
    file = study.cohort_file(role)
    entry: dict[str, Any] = ({"file": f"cohort id {study.cohort_ids[role]} (built at this site)", "sha256": None}
                             if file is None else {"file": Path(file).name, "sha256": _file_hash(file)})
    if role in study.cohort_ids:
        entry["id"] = study.cohort_ids[role]
    return entry


def _file_hash(path: Path) -> str | None:
    import hashlib

    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def study_summary(study: StudyConfig, site: SiteConfig) -> dict[str, Any]:
    """What the study computes at this site and what will leave it (shown by ``omopfl sites approve``)."""
    from omopfl.federation.codec import EVALUATE_METRICS, training_settings

    policy = site.policy
    t = study.training
    metrics = list(EVALUATE_METRICS) if policy.release_metrics else []
    return {
        "study": study.name, "hash": study.hash, "dataset_hash": study.dataset_hash, "site": site.name,
        "cohorts": {role: _cohort_summary(study, role) for role in study.cohort_roles()},
        "split": ({"method": study.split.method, "test_fraction": study.split.test_fraction,
                   "seed": study.split.seed} if study.split.method == "hash" else {"method": study.split.method}),
        "time_at_risk": list(study.time_at_risk),
        "features": study.feature_names(),
        "categories": {name: [f"{name}_{level}" for level in levels] for name, levels in study.categories.items()},
        "count_features": [f.name for f in study.concept_sets if f.aggregate == "count"]
        + [m.name for m in study.measurements if m.aggregate == "count"],
        "linked": {"imaging": list(study.imaging.modalities) if study.imaging.enabled else [],
                   "omics_genes": len(study.omics.genes) if study.omics.enabled else 0},
        "model": {"kind": study.model.kind, "parameters": _model_parameters(study)},
        "training": {"rounds": t.rounds, "local_epochs": t.local_epochs, "batch_size": t.batch_size,
                     "learning_rate": t.learning_rate, "strategy": t.strategy, "proximal_mu": t.proximal_mu,
                     "test_fraction": t.test_fraction, "seed": t.seed, "min_sites": t.min_sites,
                     "optimizer": t.optimizer, "momentum": t.momentum, "weight_decay": t.weight_decay,
                     "local_steps": t.local_steps, "server_optimizer": t.server_options()},
        "settings": training_settings(study),
        "leaves": {
            "statistics": "per feature: count, mean and sum of squared deviations over at least "
                          f"{site.min_cell_count} persons (features with fewer are withheld)",
            "weights": f"model weights after each of at most {min(t.rounds, policy.max_rounds)} rounds "
                       f"({study.model.kind})",
            "metrics": metrics,
            "counts": f"train/test row counts, only when at least {site.min_cell_count}",
        },
        "dp": {"required_by_site": policy.dp_required, "max_epsilon": policy.max_epsilon,
               "site_budget": policy.epsilon_budget},
        "privacy": {"statistics_epsilon": study.privacy.statistics_epsilon, "delta": study.privacy.delta,
                    "bounds": {name: [low, high] for name, low, high in study.privacy.bounds},
                    "dp_sgd": study.privacy.dp_sgd, "target_epsilon": study.privacy.target_epsilon,
                    "max_grad_norm": study.privacy.max_grad_norm, "budget_epsilon": study.privacy.budget_epsilon,
                    "secure_aggregation": study.privacy.secure_aggregation,
                    "participants": dict(study.privacy.participants),
                    "metrics_epsilon": study.privacy.metrics_epsilon},
        "min_cell_count": site.min_cell_count,
        **_covariates_summary(study, site),
    }


def _covariates_summary(study: StudyConfig, site: SiteConfig) -> dict[str, Any]:
    """A covariate study's analyses, windows and fixed list, and what discovery releases (issue 13b)."""
    c = study.covariates
    if c is None:
        return {}
    return {"covariates": {
        "analyses": list(c.analyses), "long_term_days": c.long_term_days, "short_term_days": c.short_term_days,
        "end_days": c.end_days, "list": Path(c.list_file).name if c.list_file else None,
        "list_sha256": c.list_sha256 or None,
        "covariates": len(c.covariate_ids) if c.covariate_ids is not None else None,
        "discovery_releases": f"covariate ids held by at least {site.min_cell_count} persons (no counts)",
    }}


def policy_problems(study: StudyConfig, site: SiteConfig) -> list[str]:
    """Why the site's policy cannot serve this study (empty: it can)."""
    policy = site.policy
    problems = []
    if study.model.kind not in policy.allowed_models:
        problems.append(f"model kind {study.model.kind!r} is not in [policy] allowed_models "
                        f"({', '.join(policy.allowed_models)})")
    if study.training.rounds > policy.max_rounds:
        problems.append(f"the study asks for {study.training.rounds} rounds, more than [policy] max_rounds "
                        f"{policy.max_rounds}")
    privacy = study.privacy
    if policy.secure_aggregation_required and not privacy.secure_aggregation:
        problems.append("[policy] secure_aggregation_required = true: the study must set [privacy] "
                        "secure_aggregation = true")
    if policy.dp_required:
        if privacy.statistics_epsilon is None:
            problems.append("[policy] dp_required = true: the study must set [privacy] statistics_epsilon and bounds")
        if not privacy.dp_sgd:
            problems.append("[policy] dp_required = true: the study must train with [privacy] dp_sgd = true")
        if privacy.metrics_epsilon is None and policy.release_metrics:
            problems.append("[policy] dp_required = true: the study must set [privacy] metrics_epsilon (DP on the "
                            "released evaluation metrics), or set [policy] release_metrics = false here")
        if privacy.budget_epsilon is None and policy.epsilon_budget is None:
            problems.append("[policy] dp_required = true: a budget is needed ([privacy] budget_epsilon in the study "
                            "or [policy] epsilon_budget here)")
    if privacy.dp_sgd and study.model.kind not in ("logistic", "mlp"):
        problems.append(f"DP-SGD is available for the logistic and mlp models, not {study.model.kind!r}")
    if (privacy.statistics_epsilon is not None and policy.max_epsilon is not None
            and privacy.statistics_epsilon > policy.max_epsilon):
        problems.append(f"[privacy] statistics_epsilon {privacy.statistics_epsilon} is above [policy] max_epsilon "
                        f"{policy.max_epsilon}")
    if (privacy.metrics_epsilon is not None and policy.max_epsilon is not None
            and privacy.metrics_epsilon > policy.max_epsilon):
        problems.append(f"[privacy] metrics_epsilon {privacy.metrics_epsilon} is above [policy] max_epsilon "
                        f"{policy.max_epsilon}")
    if privacy.statistics_epsilon is not None:
        missing = [f for f in study.feature_names() if f not in {b[0] for b in privacy.bounds}]
        if missing:
            problems.append(f"[privacy.bounds] has no bounds for {', '.join(missing)} (DP statistics need every "
                            "feature's public bounds)")
    return problems


# --------------------------------------------------------------------------------------------
# approvals
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApprovedStudy:
    """One approval in the site's state folder."""

    hash: str
    name: str
    approved_at: str
    settings: dict[str, Any]
    cohort_hashes: dict[str, str | None]
    revoked_at: str | None = None
    summary: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _load(folder: Path) -> dict[str, Any]:
    path = folder / APPROVALS_FILE
    if not path.is_file():
        return {"version": 1, "studies": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"{path}: not valid JSON: restore it from a backup or approve the studies again") from None
    if not isinstance(data, dict) or not isinstance(data.get("studies"), dict):
        raise ConfigError(f"{path}: not an omopfl approvals file")
    return data


def _save(folder: Path, data: dict[str, Any]) -> None:
    write_bytes(folder / APPROVALS_FILE, fsync=True, data=json.dumps(data, indent=1, sort_keys=True).encode())


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _entry(raw: Mapping[str, Any]) -> ApprovedStudy:
    return ApprovedStudy(hash=str(raw["hash"]), name=str(raw.get("name", "")), approved_at=str(raw["approved_at"]),
                         settings=dict(raw.get("settings", {})), cohort_hashes=dict(raw.get("cohort_hashes", {})),
                         revoked_at=raw.get("revoked_at"), summary=dict(raw.get("summary", {})))


def approve(site: SiteConfig, study: StudyConfig) -> ApprovedStudy:
    """Record ``study`` as approved by the site (its exact bytes and the settings that decide what is computed).

    Raises :class:`ConfigError` if the site's policy cannot serve the study.
    """
    problems = policy_problems(study, site)
    if problems:
        raise ConfigError(f"{site.source or site.name}: the site's policy refuses study {study.name}: "
                          + "; ".join(problems))
    summary = study_summary(study, site)
    folder = state_dir(site)
    with _locked(folder):
        (folder / "studies").mkdir(exist_ok=True, mode=0o700)
        write_bytes(folder / "studies" / f"{study.hash}.toml", study.text.encode(), fsync=True)
        data = _load(folder)
        entry = ApprovedStudy(hash=study.hash, name=study.name, approved_at=_now(), settings=summary["settings"],
                              cohort_hashes={k: v["sha256"] for k, v in summary["cohorts"].items()}, summary=summary)
        data["studies"][study.hash] = entry.to_dict()
        _save(folder, data)
    return entry


def approved_studies(site: SiteConfig) -> list[ApprovedStudy]:
    """Every approval of the site (revoked ones too), oldest first."""
    folder = state_dir(site)
    try:
        entries = [_entry(v) for v in _load(folder)["studies"].values() if isinstance(v, dict)]
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{folder / APPROVALS_FILE}: not an omopfl approvals file") from None
    return sorted(entries, key=lambda e: e.approved_at)


def approved_study(site: SiteConfig, study_hash: str) -> ApprovedStudy | None:
    """The active approval of exactly this study hash, or None."""
    if not isinstance(study_hash, str) or not _HASH_RE.match(study_hash):
        return None
    for entry in approved_studies(site):
        if entry.hash == study_hash and entry.active:
            return entry
    return None


def revoke(site: SiteConfig, study_hash: str) -> ApprovedStudy:
    """Revoke the approval whose hash is (or starts with, at least 8 characters) ``study_hash``."""
    if not isinstance(study_hash, str) or not re.match(r"^[0-9a-f]{8,64}$", study_hash):
        raise ConfigError("the study hash to revoke must be 8 to 64 lower-case hex characters "
                          "(see omopfl sites studies)")
    folder = state_dir(site)
    with _locked(folder):
        data = _load(folder)
        matches = [h for h in data["studies"] if h.startswith(study_hash)]
        if not matches:
            raise ConfigError(f"site {site.name} has no approved study with hash {study_hash}: "
                              "see omopfl sites studies")
        if len(matches) > 1:
            raise ConfigError(f"hash prefix {study_hash} matches {len(matches)} studies: give more characters")
        raw = data["studies"][matches[0]]
        if raw.get("revoked_at") is None:
            raw["revoked_at"] = _now()
            _save(folder, data)
        return _entry(raw)
