"""The site's trust boundary: omopfl's ClientApp and the one path every message takes at a site.

::

    message ─▶ code gate (site_runtime: the app bundle holds only a pyproject naming omopfl's own app)
            ─▶ serve(): which site (its own adapter, from the node config the site set)
                        which message type (only train, evaluate, query.stats, query.scaler,
                                           query.covariates, query.secagg, query.validate)
                        which study (an active approval of exactly this hash in the site's state folder)
                        which settings (every setting the message carries equals the approved study's;
                                        rounds within the study's and the policy's limit; model kind,
                                        metrics and DP as the site's policy allows)
            ─▶ omopfl's own handler, given the approved study's settings (never the message's)
            ─▶ the release rule (omopfl.release: applied by the handlers, then checked on the reply as it
                                 would leave by release.check_reply; a violation sends a fixed code)
            ─▶ audit log (omopfl.audit: appended before the reply leaves; if it cannot be written,
                          nothing but a fixed code leaves)
            ─▶ reply (or a refusal: a fixed code, nothing else)

What a coordinator sends is data, never code and never a setting that overrides the site: the
coordinator's run config (``context.run_config``) is not read here at all, and the message's config
is only compared with the approved study.  The code gate (:func:`check_bundle`) runs in omopfl's
ClientApp process (:mod:`omopfl.federation.site.runtime`) before the message is served; Flower's
``flwr-clientapp`` (which extracts the bundle and imports its components) is never run at a site.

The in-process grid (``omopfl train --simulate``, tests) calls :data:`app` and so takes the same path.
"""

from __future__ import annotations

import io
import json
import logging
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from omopfl import audit, budget, policy, release
from omopfl.atomic import write_json
from omopfl.config import SiteConfig, load_site
from omopfl.errors import Refusal, SiteFailure, wire_code
from omopfl.federation import codec
from omopfl.federation.site.statistics import scaler_reply, stats_reply

__all__ = ["app", "serve", "refuse", "check_bundle", "audit_path", "COMPONENT", "MESSAGE_TYPES", "Refusal",
           "identity_public_key"]

_log = logging.getLogger("omopfl.site")

COMPONENT = "omopfl.federation.site.app:app"
"""The only ClientApp component a site runs (what omopfl's own app bundles name)."""
ALLOWED_FILES = frozenset({"pyproject.toml", ".info/CONTENT"})
"""What an app bundle may hold: its pyproject and Flower's content manifest, nothing else."""
MAX_PYPROJECT_BYTES = 1 << 20
MESSAGE_TYPES = ("train", "evaluate", "query.stats", "query.scaler", codec.COVARIATES_QUERY, "query.secagg",
                 "query.validate")

app = ClientApp()


# --------------------------------------------------------------------------------------------
# the code gate: what an app bundle (FAB) may be
# --------------------------------------------------------------------------------------------


def check_bundle(fab: bytes) -> str:
    """``""`` if the app bundle is omopfl's own (only a pyproject naming :data:`COMPONENT`), else a code.

    Reads the zip's directory and the pyproject's text in memory; nothing is extracted or imported.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as bundle:
            infos = bundle.infolist()
            names = [i.filename for i in infos]
            if len(names) != len(set(names)) or not set(names) <= ALLOWED_FILES or "pyproject.toml" not in names:
                return "code_in_bundle"
            if any(i.file_size > MAX_PYPROJECT_BYTES for i in infos):
                return "code_in_bundle"
            if ".info/CONTENT" in names:
                listed = {line.split(",", 1)[0] for line in
                          bundle.read(".info/CONTENT").decode("utf-8").splitlines() if line.strip()}
                if not listed <= {"pyproject.toml"}:
                    return "code_in_bundle"
            config = tomllib.loads(bundle.read("pyproject.toml").decode("utf-8"))
    except (zipfile.BadZipFile, tomllib.TOMLDecodeError, UnicodeDecodeError, OSError, ValueError, KeyError):
        return "foreign_app"
    components = config.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    if not isinstance(components, dict) or components.get("clientapp") != COMPONENT:
        return "foreign_app"
    return ""


# --------------------------------------------------------------------------------------------
# the message gate
# --------------------------------------------------------------------------------------------


def _site(context: Context) -> SiteConfig:
    adapter = context.node_config.get("site-config")
    if not isinstance(adapter, str) or not adapter:
        raise SiteFailure("config")
    return load_site(adapter)


def _requested_study(message_type: str, content: RecordDict) -> str:
    """The study hash the message says it is for (the message's own claim, checked next)."""
    if message_type == "query.stats":
        return codec.decode_stats_request(content).study_hash
    if message_type == "query.scaler":
        return codec.decode_scaler(content).study_hash
    if message_type == codec.COVARIATES_QUERY:
        return codec.decode_covariates_request(content).study_hash
    if message_type == "query.secagg":
        from omopfl.federation.coordinator import secure_statistics as secure_stats

        return secure_stats.decode_request(content).study_hash
    if message_type == "query.validate":
        from omopfl.federation.coordinator.validation import decode_request

        return decode_request(content).study_hash
    config = content.config_records.get(codec.TRAIN_CONFIG)
    value = None if config is None else config.get(codec.STUDY_HASH_KEY)
    if not isinstance(value, str):
        raise codec.CodecError(f"config key {codec.STUDY_HASH_KEY!r} is missing")
    return value


def _same(sent: Any, approved: Any) -> bool:
    if isinstance(approved, bool) or isinstance(sent, bool):
        return type(sent) is type(approved) and sent == approved
    if isinstance(approved, int | float) and isinstance(sent, int | float):
        return float(sent) == float(approved)
    return type(sent) is type(approved) and sent == approved


def _prepared_study_hash(context: Context, site: SiteConfig) -> str:
    return str(_prepared_manifest(context, site).get("study_hash", ""))


def _prepared_manifest(context: Context, site: SiteConfig) -> dict[str, Any]:
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
    manifest = _prepared_manifest(context, site)
    approved_dataset = approved.summary.get("dataset_hash")
    if approved_dataset and manifest.get("dataset_hash"):
        return str(manifest["dataset_hash"]) == str(approved_dataset)
    return str(manifest.get("study_hash", "")) == approved.hash


def _sent(site: SiteConfig, run_id: int, message_type: str) -> int:
    """Replies of this type the site already sent in this run (from its audit log)."""
    return sum(1 for e in audit.read(audit_path(site), run_id=run_id)
               if e.get("message_type") == message_type and e.get("outcome") == "sent")


def _admit_training(message_type: str, content: RecordDict, context: Context, site: SiteConfig,
                    approved: policy.ApprovedStudy, run_id: int) -> RecordDict:
    """The content the handler gets: the message's weights with the approved study's settings."""
    config = dict(content.config_records[codec.TRAIN_CONFIG])
    settings = dict(approved.settings)
    for key, value in config.items():
        if key in codec.ROUND_KEYS:
            continue
        if key not in settings or not _same(value, settings[key]):
            _log.warning("omopfl site %s: %s refused: setting %s differs from the approved study", site.name,
                         message_type, key)
            raise Refusal("settings_mismatch")
    rules = site.policy
    dp_sgd = bool(_privacy(approved).get("dp_sgd"))
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
        if server_round > limit or _sent(site, run_id, "train") >= limit:
            raise Refusal("round_limit")
    elif not rules.release_metrics:
        raise Refusal("policy")
    elif server_round > limit or _sent(site, run_id, "evaluate") >= limit:  # bounded repeated evaluations
        raise Refusal("round_limit")
    effective = {key: value for key, value in settings.items() if key != "rounds"}
    privacy = _privacy(approved)
    if privacy.get("dp_sgd"):  # the site's own DP-SGD settings, from the approved study (never the message)
        effective.update({"dp-sgd": True, "dp-target-epsilon": float(privacy["target_epsilon"]),
                          "dp-delta": float(privacy.get("delta") or 1e-6),
                          "dp-max-grad-norm": float(privacy.get("max_grad_norm") or 1.0),
                          "dp-rounds": int(settings["rounds"]), "dp-budget": float(privacy.get("budget_epsilon") or 0)})
    release_metrics = rules.release_metrics
    metrics_epsilon = privacy.get("metrics_epsilon")
    if metrics_epsilon is not None:  # DP on the released metrics (omopfl.dp_metrics), charged to the ledger
        ledger, budget_limit = _ledger(site, approved)
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
        records.update(_scaffold_records(content))
        # the site's own control variate c_i: its state folder, per study and run (never the message)
        effective["scaffold-state"] = str(_scaffold_state(site, approved, run_id))
        records[codec.TRAIN_CONFIG] = ConfigRecord(effective)
    return RecordDict(records)


def _scaffold_records(content: RecordDict) -> dict[str, Any]:
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


def _scaffold_state(site: SiteConfig, approved: policy.ApprovedStudy, run_id: int) -> Path:
    return policy.state_dir(site) / "scaffold" / f"{approved.hash[:32]}-{int(run_id)}.npz"


def _privacy(approved: policy.ApprovedStudy) -> dict[str, Any]:
    return dict(approved.summary.get("privacy") or {})


def _ledger(site: SiteConfig, approved: policy.ApprovedStudy) -> tuple[budget.Ledger, float | None]:
    privacy = _privacy(approved)
    ledger = budget.Ledger(policy.state_dir(site), approved.hash, float(privacy.get("delta") or 1e-6))
    return ledger, budget.limit(privacy.get("budget_epsilon"), site.policy.epsilon_budget)


def _admit_stats(content: RecordDict, site: SiteConfig, approved: policy.ApprovedStudy) -> codec.DPRequest | None:
    """The DP the site applies to this statistics release: the approved study's, which the request must state."""
    request = codec.decode_stats_request(content)
    rules = site.policy
    privacy = _privacy(approved)
    epsilon = privacy.get("statistics_epsilon")
    if epsilon is None:
        if request.dp is not None:
            raise Refusal("settings_mismatch")
        if rules.dp_required:
            raise Refusal("policy")
        return None
    bounds = {str(k): (float(v[0]), float(v[1])) for k, v in dict(privacy.get("bounds") or {}).items()}
    if (request.dp is None or not _same(request.dp.epsilon, epsilon) or not _same(request.dp.delta, privacy["delta"])
            or any(tuple(request.dp.bounds.get(name, ())) != pair for name, pair in bounds.items())):
        raise Refusal("settings_mismatch")
    if rules.max_epsilon is not None and float(epsilon) > rules.max_epsilon:
        raise Refusal("policy")
    ledger, limit = _ledger(site, approved)
    if not ledger.fits(limit, statistics=float(epsilon)):
        raise Refusal("budget_spent")
    # missingness indicators are 0/1 by construction: the site bounds them itself
    return codec.DPRequest(float(epsilon), float(privacy["delta"]), {**_indicator_bounds(approved), **bounds})


def _indicator_bounds(approved: policy.ApprovedStudy) -> dict[str, tuple[float, float]]:
    return {f"{name}{codec.MISSING_SUFFIX}": (0.0, 1.0) for name in approved.summary.get("features", [])}


def _handle(message_type: str, content: RecordDict, context: Context, site: SiteConfig, run_id: int,
            spent: dict[str, float]) -> RecordDict:
    study_hash = _requested_study(message_type, content)
    approved = policy.approved_study(site, study_hash)
    if approved is None:
        _log.warning("omopfl site %s: %s refused: study %s is not approved here", site.name, message_type,
                     study_hash[:12] or "(none)")
        raise Refusal("study_not_approved")
    if not prepared_for(context, site, approved):
        raise SiteFailure("study_mismatch")
    if message_type == "query.secagg":
        return _secagg(content, context, site, approved, run_id, spent)
    if message_type == "query.stats":
        if _privacy(approved).get("secure_aggregation"):  # the study's statistics leave only as masked sums
            raise Refusal("settings_mismatch")
        if site.policy.secure_aggregation_required:
            raise Refusal("policy")
        dp = _admit_stats(content, site, approved)
        reply = stats_reply(content, context, site, approved.summary, dp=dp)
        if dp is not None and codec.decode_site_reply(reply).status == "ok":
            ledger, _limit = _ledger(site, approved)
            spent.update(epsilon=dp.epsilon, epsilon_total=ledger.charge(statistics=dp.epsilon))
        return reply
    if message_type == "query.scaler":
        return scaler_reply(content, context, site, approved.summary)
    if message_type == codec.COVARIATES_QUERY:  # covariate discovery (issue 13b)
        from omopfl.federation.site.covariates import covariates_reply

        return covariates_reply(content, context, site)
    if message_type == "query.validate":  # federated external validation (issue 14)
        from omopfl.federation.site.validation import validate_reply

        return validate_reply(content, context, site, approved, _sent(site, run_id, message_type))

    secure = bool(_privacy(approved).get("secure_aggregation"))
    from omopfl.federation.coordinator.secure_rounds import TRAIN_RECORD

    if TRAIN_RECORD in content.config_records and not (secure and message_type == "train"):
        raise Refusal("settings_mismatch")
    ledger, _limit = _ledger(site, approved)
    before = ledger.spent()
    # the update leaves only masked (omopfl.federation.coordinator.secure_rounds)
    if secure and message_type == "train":
        reply = _secagg_train(content, context, site, approved, run_id, spent)
    else:
        reply = handle(message_type, _admit_training(message_type, content, context, site, approved,
                                                                run_id), context)
    after = ledger.spent()
    if after > before:  # DP-SGD and/or DP metrics spent on this message: the audit log shows it
        spent.update(epsilon=round(after - before, 9), epsilon_total=round(after, 9))
    return reply


def _secagg_state(site: SiteConfig, approved: policy.ApprovedStudy, run_id: int) -> Path:
    return policy.state_dir(site) / "secagg" / f"{approved.hash[:32]}-{int(run_id)}.json"


def _identity_key(site: SiteConfig) -> Any:
    """The site's long-lived Ed25519 identity key for secure aggregation (made on first use, state folder)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = policy.state_dir(site) / "secagg" / "identity.json"
    if path.is_file():
        return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(json.loads(path.read_text())["key"]))
    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    write_json(path, private=True, data={"key": raw.hex()})
    return key


def identity_public_key(site: SiteConfig) -> str:
    """The site's Ed25519 identity public key (hex), to pin in a study's ``[privacy.participants]``."""
    from cryptography.hazmat.primitives import serialization

    return _identity_key(site).public_key().public_bytes(serialization.Encoding.Raw,
                                                         serialization.PublicFormat.Raw).hex()


def _secagg(content: RecordDict, context: Context, site: SiteConfig, approved: policy.ApprovedStudy, run_id: int,
            spent: dict[str, float]) -> RecordDict:
    """The site's side of :mod:`omopfl.federation.coordinator.secure_statistics`: publish a run key, then mask
    its release.

    The run's X25519 private key and the release stay in the site's state folder between the steps; each
    mask round is answered once per run; the participant list must name this site with its own key and
    at least ``max(3, the study's min_sites)`` distinct sites.  The release is the one ``query.stats``
    would send (release rule, the study's DP charged to the ledger once)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from omopfl import secagg
    from omopfl.federation.coordinator import secure_statistics as secure_stats
    from omopfl.suppression import Released

    if not _privacy(approved).get("secure_aggregation"):
        raise Refusal("settings_mismatch")
    request = secure_stats.decode_request(content)
    if request.phase == "train-keys":
        return _train_keys(site, approved, run_id)
    path = _secagg_state(site, approved, run_id)
    run = f"{approved.hash}:{int(run_id)}"
    if request.phase == "keys":
        if path.is_file():  # one key per run: a second key set would allow sums over other participant sets
            raise SiteFailure("secagg_refused")
        # the release is made once, now, as query.stats would send it (release rule; DP charged once)
        dp = None
        privacy = _privacy(approved)
        if privacy.get("statistics_epsilon") is not None:
            bounds = {str(k): (float(v[0]), float(v[1])) for k, v in dict(privacy.get("bounds") or {}).items()}
            dp = codec.DPRequest(float(privacy["statistics_epsilon"]), float(privacy["delta"]), bounds)
        plain = codec.encode_stats_request(approved.hash, dp)
        dp = _admit_stats(plain, site, approved)
        reply = stats_reply(plain, context, site, approved.summary, dp=dp)
        release.check_reply("query.stats", {name: dict(record) for name, record in reply.items()},
                            site.min_cell_count)
        decoded = codec.decode_site_reply(reply)
        if decoded.status == "error":
            raise SiteFailure(decoded.code)
        contributed = decoded.status == "ok" and decoded.released is not None
        if dp is not None and contributed:
            ledger, _limit = _ledger(site, approved)
            spent.update(epsilon=dp.epsilon, epsilon_total=ledger.charge(statistics=dp.epsilon))
        private = X25519PrivateKey.generate()
        raw = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                    serialization.NoEncryption())
        record = decoded.released.to_record() if contributed and decoded.released is not None else None
        write_json(path, private=True, data={"key": raw.hex(), "rounds": [], "names": list(decoded.feature_names),
                              "release": record})
        public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        signature = _identity_key(site).sign(secagg.PublicKeyBundle(site.name, run, public).signed_bytes())
        return secure_stats.encode_keys_reply(site.name, public, list(decoded.feature_names), signature)
    if not path.is_file():
        raise SiteFailure("secagg_refused")
    state = json.loads(path.read_text())
    if request.round in state["rounds"] or (request.round == 2 and 1 not in state["rounds"]):
        raise SiteFailure("secagg_refused")
    need = max(secagg.MIN_SITES, int(approved.summary.get("training", {}).get("min_sites") or 1))
    if len(set(request.sites)) != len(request.sites) or len(request.sites) < need or site.name not in request.sites:
        _log.warning("omopfl site %s: secure aggregation refused: %d participant(s) listed, %d needed, this site "
                     "%s", site.name, len(set(request.sites)), need,
                     "listed" if site.name in request.sites else "not listed")
        raise SiteFailure("secagg_refused")
    pinned = dict(_privacy(approved).get("participants") or {})
    trusted = None
    if pinned:  # only the sites the approved study names, each bundle signed by its pinned identity key
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        if any(name not in pinned for name in request.sites):
            _log.warning("omopfl site %s: secure aggregation refused: a participant is not pinned in the study",
                         site.name)
            raise SiteFailure("secagg_refused")
        trusted = {name: Ed25519PublicKey.from_public_bytes(bytes.fromhex(key)) for name, key in pinned.items()}
    private = X25519PrivateKey.from_private_bytes(bytes.fromhex(state["key"]))
    k = len(state["names"])
    try:
        session = secagg.SecAggSession(site.name, request.sites, run, private_key=private,
                                       frac_bits=secure_stats.FRAC_BITS)
        session.set_peer_keys([{"site": name, "run_id": run, "public_key": key, "signature": signature}
                               for name, key, signature in zip(request.sites, request.keys, request.signatures,
                                                               strict=True)], trusted=trusted)
        released = None if state["release"] is None else Released.from_record(state["release"])
        if request.round == 1:
            vector = np.zeros(2 + 2 * k) if released is None else secure_stats.round1_vector(released, True)
        else:
            if len(request.centre) != k:
                raise secagg.SecAggError(f"centre has {len(request.centre)} values for {k} features")
            vector = np.zeros(k) if released is None else secure_stats.round2_vector(released, True,
                                                                                     request.centre)
        masked = session.mask(vector, f"round-{request.round}", "moments")
    except secagg.SecAggError as exc:
        _log.warning("omopfl site %s: secure aggregation refused: %s", site.name, exc)
        raise SiteFailure("secagg_refused") from None
    state["rounds"].append(request.round)
    if request.round == 2:
        path.unlink()  # the run's key is not needed any more
    else:
        write_json(path, private=True, data=state)
    return secure_stats.encode_masked_reply(masked)


def _train_state(site: SiteConfig, approved: policy.ApprovedStudy, run_id: int) -> Path:
    return policy.state_dir(site) / "secagg" / f"{approved.hash[:32]}-{int(run_id)}-train.json"


def _train_run(approved: policy.ApprovedStudy, run_id: int) -> str:
    return f"{approved.hash}:{int(run_id)}:train"


def _train_keys(site: SiteConfig, approved: policy.ApprovedStudy, run_id: int) -> RecordDict:
    """The training key round: one fresh X25519 key per run (a second request is refused: no re-keying)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from omopfl import secagg
    from omopfl.federation.coordinator import secure_statistics as secure_stats

    path = _train_state(site, approved, run_id)
    if path.is_file():
        _log.warning("omopfl site %s: secure aggregation refused: a second training key round in run %d", site.name,
                     int(run_id))
        raise SiteFailure("secagg_refused")
    private = X25519PrivateKey.generate()
    raw = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
    write_json(path, private=True, data={"key": raw.hex(), "participants": None, "rounds": []})
    public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    signature = _identity_key(site).sign(secagg.PublicKeyBundle(site.name, _train_run(approved, run_id),
                                                                public).signed_bytes())
    return secure_stats.encode_keys_reply(site.name, public, [], signature)


def _participants_session(site: SiteConfig, approved: policy.ApprovedStudy, run: str, private: Any,
                          sites: tuple[str, ...], keys: tuple[str, ...], signatures: tuple[str, ...],
                          frac_bits: int) -> Any:
    """A :class:`omopfl.secagg.SecAggSession` over the listed participants, after the site's checks: distinct
    names, this site among them, at least ``max(3, min_sites)``, only pinned names with their signatures when
    the study pins ``[privacy.participants]``.  Raises ``SiteFailure("secagg_refused")``."""
    from omopfl import secagg

    need = max(secagg.MIN_SITES, int(approved.summary.get("training", {}).get("min_sites") or 1))
    if len(set(sites)) != len(sites) or len(sites) < need or site.name not in sites:
        _log.warning("omopfl site %s: secure aggregation refused: %d participant(s) listed, %d needed, this site "
                     "%s", site.name, len(set(sites)), need, "listed" if site.name in sites else "not listed")
        raise SiteFailure("secagg_refused")
    pinned = dict(_privacy(approved).get("participants") or {})
    trusted = None
    if pinned:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        if any(name not in pinned for name in sites):
            _log.warning("omopfl site %s: secure aggregation refused: a participant is not pinned in the study",
                         site.name)
            raise SiteFailure("secagg_refused")
        trusted = {name: Ed25519PublicKey.from_public_bytes(bytes.fromhex(key)) for name, key in pinned.items()}
    try:
        session = secagg.SecAggSession(site.name, sites, run, private_key=private, frac_bits=frac_bits)
        session.set_peer_keys([{"site": name, "run_id": run, "public_key": key, "signature": signature}
                               for name, key, signature in zip(sites, keys, signatures, strict=True)],
                              trusted=trusted)
    except secagg.SecAggError as exc:
        _log.warning("omopfl site %s: secure aggregation refused: %s", site.name, exc)
        raise SiteFailure("secagg_refused") from None
    return session


def _secagg_train(content: RecordDict, context: Context, site: SiteConfig, approved: policy.ApprovedStudy,
                  run_id: int, spent: dict[str, float]) -> RecordDict:
    """A ``train`` reply of a secure-aggregation study: only the masked update (and the released evaluation).

    Checked before training: the run's training key exists (``train-keys``), the participant list passes
    :func:`_participants_session` and equals the first masked round's, this round was not masked yet (and
    :func:`_admit_training` bounds it by the study's rounds).  The plain reply never leaves the site."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from omopfl import secagg
    from omopfl.federation.coordinator import secure_rounds as secure_train
    from omopfl.federation.coordinator import secure_statistics as secure_stats

    request = secure_train.decode_train_request(content)
    admitted = _admit_training("train", content, context, site, approved, run_id)
    server_round = int(admitted.config_records[codec.TRAIN_CONFIG]["server-round"])
    path = _train_state(site, approved, run_id)
    if not path.is_file():
        _log.warning("omopfl site %s: secure aggregation refused: no training key round in run %d", site.name,
                     int(run_id))
        raise SiteFailure("secagg_refused")
    state = json.loads(path.read_text())
    listed = {"sites": list(request.sites), "keys": list(request.keys)}
    if server_round in state["rounds"] or not state.get("key"):
        _log.warning("omopfl site %s: secure aggregation refused: round %d was masked already", site.name,
                     server_round)
        raise SiteFailure("secagg_refused")
    if state["participants"] is not None and state["participants"] != listed:
        _log.warning("omopfl site %s: secure aggregation refused: the participants differ from the run's first "
                     "round", site.name)
        raise SiteFailure("secagg_refused")
    private = X25519PrivateKey.from_private_bytes(bytes.fromhex(state["key"]))
    session = _participants_session(site, approved, _train_run(approved, run_id), private, request.sites,
                                    request.keys, request.signatures, secure_train.FRAC_BITS)
    received = admitted.array_records.get(codec.TRAIN_ARRAYS)
    if received is None:
        raise codec.CodecError("arrays record missing")
    plain = handle("train", admitted, context)
    try:
        vector, _n = secure_train.train_vector(plain, received)
        masked = session.mask(vector, secure_train.round_id(server_round), secure_train.LABEL)
    except secagg.SecAggError as exc:
        _log.warning("omopfl site %s: secure aggregation refused in round %d: %s", site.name, server_round, exc)
        raise SiteFailure("secagg_refused") from None
    # DP-SGD's epsilon is not sent with a masked update: the audit log shows it (_handle)
    state["rounds"].append(server_round)
    state["participants"] = listed
    if server_round >= int(approved.settings["rounds"]):
        state["key"] = ""  # the study's last round: the key is not needed any more
    write_json(path, private=True, data=state)
    reply = secure_stats.encode_masked_reply(masked)
    if codec.TRAIN_EVALUATE in plain.metric_records:  # the released evaluation of the received model (clear)
        reply[codec.TRAIN_EVALUATE] = plain.metric_records[codec.TRAIN_EVALUATE]
    return reply


def _feature_names(context: Context, site: SiteConfig) -> list[str]:
    folder = Path(str(context.node_config.get("prepared-dir", ""))) / site.name
    return list(json.loads((folder / "manifest.json").read_text()).get("feature_names", []))


# --------------------------------------------------------------------------------------------
# audit and reply
# --------------------------------------------------------------------------------------------


def audit_path(site: SiteConfig) -> Path:
    """The site's audit log (in its state folder)."""
    return policy.state_dir(site) / audit.AUDIT_FILE


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"bytes": len(value)}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, float) and value != value:  # NaN has no JSON form
        return None
    return value


def describe(content: RecordDict) -> tuple[list[dict[str, Any]], int]:
    """(records as the audit log lists them, bytes of the serialized reply)."""
    from omopfl.federation.flower_internals import wire_bytes

    records = []
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            records.append({"name": name, "kind": "array", "keys": list(record.keys()),
                            "arrays": [{"key": k, "shape": list(a.shape), "dtype": str(a.dtype),
                                        "sha256": a.object_id} for k, a in record.items()]})
        elif isinstance(record, MetricRecord):
            records.append({"name": name, "kind": "metric", "keys": list(record.keys()),
                            "values": {k: _plain(v) for k, v in record.items()}})
        elif isinstance(record, ConfigRecord):
            records.append({"name": name, "kind": "config", "keys": list(record.keys()),
                            "values": {k: _plain(v) for k, v in record.items()}})
    return records, wire_bytes(content)


def _send(message: Message, context: Context, site: SiteConfig | None, study_hash: str, reply: RecordDict,
          code: str, spent: dict[str, float] | None = None) -> Message:
    """Append the reply to the site's audit log, then hand it over; if the log cannot be written,
    nothing but a fixed code leaves (and if even that cannot be logged, nothing at all)."""
    meta = message.metadata
    server_round = None
    incoming = message.content.config_records.get(codec.TRAIN_CONFIG) if message.has_content() else None
    if incoming is not None and isinstance(incoming.get("server-round"), int):
        server_round = int(incoming["server-round"])
    for attempt in range(2):
        records, size = describe(reply)
        entry = {"run_id": int(meta.run_id), "site": site.name if site else None, "study_hash": study_hash,
                 "message_type": meta.message_type, "server_round": server_round,
                 "outcome": "refused" if code else "sent", "code": code, "records": records, "bytes": size,
                 "sha256": reply.object_id, **({"privacy": dict(spent)} if spent else {})}
        if site is None:
            break
        try:
            audit.append(audit_path(site), entry)
            break
        except (OSError, ValueError) as exc:
            _log.error("omopfl site %s: the audit log cannot be written (%s); sending a fixed code only",
                       site.name, type(exc).__name__)
            if attempt:
                raise RuntimeError("omopfl site error: audit") from None
            code, reply = "internal", codec.encode_error(site.name, "internal")
    return Message(reply, reply_to=message)


def serve(message: Message, context: Context) -> Message:
    """The one path every message takes at a site (see the module docstring)."""
    site: SiteConfig | None = None
    study_hash, code = "", ""
    spent: dict[str, float] = {}
    message_type = message.metadata.message_type
    try:
        site = _site(context)
        if message_type not in MESSAGE_TYPES:
            raise Refusal("not_allowed")
        if not message.has_content():
            raise codec.CodecError("the message has no content")
        try:
            study_hash = _requested_study(message_type, message.content)
        except codec.CodecError:
            study_hash = ""
        reply = _handle(message_type, message.content, context, site, int(message.metadata.run_id), spent)
        release.check_reply(message_type, {name: dict(record) for name, record in reply.items()
                                           if not isinstance(record, ArrayRecord)}, site.min_cell_count)
    except Exception as exc:  # every failure is a fixed code; the text may echo data and stays here
        code = wire_code(exc)
        _log.warning("omopfl site %s: %s -> %s (%s)", site.name if site else "?", message_type, code,
                     type(exc).__name__)
        reply = codec.encode_error(site.name if site else None, code)
    return _send(message, context, site, study_hash if len(study_hash) <= 128 else "", reply, code, spent)


def refuse(message: Message, context: Context, code: str) -> Message:
    """A refusal decided before :func:`serve` (the code gate), audited like every reply."""
    site: SiteConfig | None
    try:
        site = _site(context)
    except Exception:
        site = None
    _log.warning("omopfl site %s: %s refused: %s", site.name if site else "?", message.metadata.message_type, code)
    return _send(message, context, site, "", codec.encode_error(site.name if site else None, code), code)


def handle(message_type: str, content: RecordDict, context: Context) -> RecordDict:
    """Run an admitted ``train``/``evaluate`` here, or in the node's long-lived worker if it has one
    (:mod:`omopfl.federation.site.worker`: torch loaded, tensors cached)."""
    from omopfl.federation.site import training as site_train
    from omopfl.federation.site import worker

    socket_path = context.node_config.get("worker-socket")
    if isinstance(socket_path, str) and socket_path:
        try:
            return worker.call(socket_path, message_type, content, context)
        except worker.WorkerUnavailable:
            _log.warning("omopfl: the site worker is not reachable; running %s in this process", message_type)
    return site_train.HANDLERS[message_type](content, context)


@app.train()
def _train(message: Message, context: Context) -> Message:
    return serve(message, context)


@app.evaluate()
def _evaluate(message: Message, context: Context) -> Message:
    return serve(message, context)


@app.query("stats")
def _stats(message: Message, context: Context) -> Message:
    return serve(message, context)


@app.query("scaler")
def _scaler(message: Message, context: Context) -> Message:
    return serve(message, context)


@app.query("secagg")
def _secagg_query(message: Message, context: Context) -> Message:
    return serve(message, context)


@app.query("validate")
def _validate(message: Message, context: Context) -> Message:
    return serve(message, context)


@app.query("covariates")
def _covariates(message: Message, context: Context) -> Message:
    return serve(message, context)
