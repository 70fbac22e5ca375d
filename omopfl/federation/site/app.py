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
is only compared with the approved study.  The code gate (:mod:`omopfl.federation.site.bundle`) runs in omopfl's
ClientApp process (:mod:`omopfl.federation.site.runtime`) before the message is served; Flower's
``flwr-clientapp`` (which extracts the bundle and imports its components) is never run at a site.

The in-process grid (``omopfl train --simulate``, tests) calls :data:`app` and so takes the same path.
"""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from omopfl import audit, policy, release
from omopfl.config import SiteConfig
from omopfl.errors import Refusal, SiteFailure, wire_code
from omopfl.federation import codec
from omopfl.federation.site.admission import (
    admit_stats,
    admit_training,
    node_site,
    prepared_for,
    requested_study,
    study_ledger,
    study_privacy,
)
from omopfl.federation.site.audit_trail import audit_path, describe, sent_replies
from omopfl.federation.site.secure import (
    secagg_query,
    secagg_train,
)
from omopfl.federation.site.statistics import scaler_reply, stats_reply
from omopfl.federation.site.worker import handle

__all__ = ["app", "serve", "refuse", "MESSAGE_TYPES", "Refusal"]

_log = logging.getLogger("omopfl.site")

MESSAGE_TYPES = ("train", "evaluate", "query.stats", "query.scaler", codec.COVARIATES_QUERY, "query.secagg",
                 "query.validate")

app = ClientApp()


# --------------------------------------------------------------------------------------------
# the code gate: what an app bundle (FAB) may be
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# the message gate
# --------------------------------------------------------------------------------------------


def _handle(message_type: str, content: RecordDict, context: Context, site: SiteConfig, run_id: int,
            spent: dict[str, float]) -> RecordDict:
    study_hash = requested_study(message_type, content)
    approved = policy.approved_study(site, study_hash)
    if approved is None:
        _log.warning("omopfl site %s: %s refused: study %s is not approved here", site.name, message_type,
                     study_hash[:12] or "(none)")
        raise Refusal("study_not_approved")
    if not prepared_for(context, site, approved):
        raise SiteFailure("study_mismatch")
    if message_type == "query.secagg":
        return secagg_query(content, context, site, approved, run_id, spent)
    if message_type == "query.stats":
        if study_privacy(approved).get("secure_aggregation"):  # the study's statistics leave only as masked sums
            raise Refusal("settings_mismatch")
        if site.policy.secure_aggregation_required:
            raise Refusal("policy")
        dp = admit_stats(content, site, approved)
        reply = stats_reply(content, context, site, approved.summary, dp=dp)
        if dp is not None and codec.decode_site_reply(reply).status == "ok":
            ledger, _limit = study_ledger(site, approved)
            spent.update(epsilon=dp.epsilon, epsilon_total=ledger.charge(statistics=dp.epsilon))
        return reply
    if message_type == "query.scaler":
        return scaler_reply(content, context, site, approved.summary)
    if message_type == codec.COVARIATES_QUERY:  # covariate discovery (issue 13b)
        from omopfl.federation.site.covariates import covariates_reply

        return covariates_reply(content, context, site)
    if message_type == "query.validate":  # federated external validation (issue 14)
        from omopfl.federation.site.validation import validate_reply

        return validate_reply(content, context, site, approved, sent_replies(site, run_id, message_type))

    secure = bool(study_privacy(approved).get("secure_aggregation"))
    from omopfl.federation.codec_secure_rounds import TRAIN_RECORD

    if TRAIN_RECORD in content.config_records and not (secure and message_type == "train"):
        raise Refusal("settings_mismatch")
    ledger, _limit = study_ledger(site, approved)
    before = ledger.spent()
    # the update leaves only masked (omopfl.federation.coordinator.secure_rounds)
    if secure and message_type == "train":
        reply = secagg_train(content, context, site, approved, run_id, spent)
    else:
        reply = handle(message_type, admit_training(message_type, content, context, site, approved,
                                                                run_id), context)
    after = ledger.spent()
    if after > before:  # DP-SGD and/or DP metrics spent on this message: the audit log shows it
        spent.update(epsilon=round(after - before, 9), epsilon_total=round(after, 9))
    return reply


# --------------------------------------------------------------------------------------------
# audit and reply
# --------------------------------------------------------------------------------------------


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
        site = node_site(context)
        if message_type not in MESSAGE_TYPES:
            raise Refusal("not_allowed")
        if not message.has_content():
            raise codec.CodecError("the message has no content")
        try:
            study_hash = requested_study(message_type, message.content)
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
        site = node_site(context)
    except Exception:
        site = None
    _log.warning("omopfl site %s: %s refused: %s", site.name if site else "?", message.metadata.message_type, code)
    return _send(message, context, site, "", codec.encode_error(site.name if site else None, code), code)


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
