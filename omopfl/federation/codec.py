"""Wire format of the federated statistics: the only module that knows record names and keys.

Everything a site sends is built here from a :class:`omopfl.suppression.Released` (the output of
:func:`omopfl.suppression.suppress`) or from a fixed status code, and everything the server reads is
checked here against an allow-list.  A message holds plain numbers, lists of numbers, the
site's name (from its own adapter), the study's feature names and fixed status/error codes:
never a person id, a date, a path, a raw value or exception text.

Messages
--------
``query.stats`` (server -> site), :func:`encode_stats_request`
    ConfigRecord ``omopfl.request``: ``protocol``, ``study-hash`` (``""``: not checked) and,
    only when differential privacy is requested, ``dp-epsilon``, ``dp-delta``, ``dp-features``,
    ``dp-low``, ``dp-high`` (public clipping bounds per feature).

stats reply (site -> server), :func:`encode_site_stats` / :func:`encode_error`
    ConfigRecord ``omopfl.site``: ``protocol``, ``site``, ``status`` (``ok`` | ``withheld`` |
    ``error``), ``code`` (``""`` or one of :data:`ERROR_CODES`), ``feature-names`` (not in an
    error reply), ``dp-epsilon``/``dp-delta`` (only when noise was added).
    MetricRecord ``omopfl.moments`` (only when ``status == "ok"``): ``persons``, ``released``
    (0/1 per feature), ``n``, ``mean``, ``m2`` (released features only, in feature order).
    A withheld site sends no numbers at all, not even its person count.

``query.scaler`` (server -> site), :func:`encode_scaler`
    ConfigRecord ``omopfl.scaler``: ``protocol``, ``study-hash``, ``feature-names``.
    MetricRecord ``omopfl.scaler-values``: ``mean``, ``scale`` (the global
    :class:`omopfl.moments.Scaler`), ``n`` (global non-missing count per feature), ``persons``
    (persons over the contributing sites), ``indicator`` (1 for a missingness-indicator column).

scaler reply (site -> server), :func:`encode_ack`
    ConfigRecord ``omopfl.site`` with ``protocol``, ``site``, ``status`` (``ok`` | ``error``), ``code``.

Decoders raise :class:`CodecError` (a ``ValueError`` whose text names keys, never values).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from omopfl.errors import WIRE_CODES, CodecError
from omopfl.moments import Scaler
from omopfl.suppression import Released

__all__ = [
    "scaler_ack_code",
    "finite_list",
    "PROTOCOL",
    "STATS_QUERY",
    "SCALER_QUERY",
    "ERROR_CODES",
    "MISSING_SUFFIX",
    "REPLY_KEYS",
    "CodecError",
    "DPRequest",
    "StatsRequest",
    "SiteReply",
    "GlobalScaler",
    "encode_stats_request",
    "decode_stats_request",
    "encode_site_stats",
    "encode_error",
    "encode_ack",
    "decode_site_reply",
    "encode_scaler",
    "decode_scaler",
    "scaler_record",
    "to_plain",
    "ERROR_TEXT",
    "STUDY_HASH_KEY",
    "ROUND_KEYS",
    "training_settings",
    "covariate_settings",
    "split_settings",
    "refusal_summary",
    "ERROR_ADVICE",
    "audit_entry",
    "reply_refusal",
    "study_dp_config",
]

PROTOCOL = 1
STATS_QUERY = "query.stats"
SCALER_QUERY = "query.scaler"

ERROR_CODES = WIRE_CODES
"""Fixed error codes a site may send; nothing else about an error leaves a site."""

ERROR_TEXT: Mapping[str, str] = {
    "study_not_approved": "study not approved", "settings_mismatch": "settings differ from the approved study",
    "policy": "refused by the site's policy", "round_limit": "more rounds than approved",
    "foreign_app": "app is not omopfl's", "code_in_bundle": "app bundle holds code", "not_allowed": "message refused",
    "study_mismatch": "prepared for another study", "not_prepared": "not prepared", "config": "site misconfigured",
    "feature_mismatch": "features differ", "bad_request": "malformed message", "dp_bounds": "DP bounds missing",
    "internal": "internal error", "release_rule": "withheld by the release rule",
    "budget_spent": "privacy budget spent",
    "secagg_refused": "secure aggregation refused",
}
"""What the coordinator's log says for each code."""

ERROR_ADVICE: Mapping[str, str] = {
    "study_not_approved": "approve the study at the site (omopfl sites approve --study STUDY --site ADAPTER)",
    "study_mismatch": "prepare the site's dataset for this study (omopfl prepare); a change of [model], [training] "
                      "or [privacy] alone needs a new approval, no re-preparation",
    "not_prepared": "prepare the site's dataset for this study (omopfl prepare)",
    "feature_mismatch": "prepare the site's dataset for this study (omopfl prepare)",
    "settings_mismatch": "send the approved study's settings (leave out overrides such as --strategy fedprox)",
    "policy": "fit the study to the site's [policy] (omopfl sites approve shows what it refuses)",
    "config": "fix the site's adapter",
}
"""What to do about a refusal (the coordinator's one-line failure messages)."""


def refusal_summary(failed: Sequence[Mapping[str, Any]]) -> str:
    """One line naming which sites refused with which code and what to do, e.g.
    ``site_a, site_b: prepared for another study (study_mismatch): it prepares ...``; ``""`` for none."""
    by_code: dict[str, list[str]] = {}
    for f in failed:
        by_code.setdefault(str(f.get("code", "")), []).append(str(f.get("site") or f"node {f.get('node')}"))
    parts = []
    for code, names in by_code.items():
        advice = ERROR_ADVICE.get(code)
        parts.append(f"{', '.join(names)}: {ERROR_TEXT.get(code, code)} ({code})" + (f": {advice}" if advice else ""))
    return "; ".join(parts)

STUDY_HASH_KEY = "study-hash"
"""Config key of every training/evaluation message naming the study it is for."""
ROUND_KEYS = ("server-round", "evaluate-received", STUDY_HASH_KEY)
"""Config keys of a training/evaluation message that are not study settings."""

MISSING_SUFFIX = "__missing"

# training messages (Flower's strategy conventions: one ArrayRecord, one MetricRecord, one ConfigRecord)
TRAIN_ARRAYS = "arrays"
TRAIN_METRICS = "metrics"
TRAIN_CONFIG = "config"
TRAIN_EVALUATE = "evaluate"
"""The evaluation of the received weights that a ``train`` reply may carry (a second MetricRecord)."""
WEIGHT_KEY = "num-examples"
EVALUATE_METRICS = ("loss", "auc", "accuracy", "f1", "kappa")
SCAFFOLD_C_PREFIX = "scaffold-c/"
"""Issue 14b: keys ``scaffold-c/<parameter>`` of a SCAFFOLD ``train`` message's ArrayRecord (the global control
variate ``c`` beside the weights; Flower's strategies expect one ArrayRecord per message)."""
SCAFFOLD_C = "scaffold-c"
"""The ArrayRecord in which a site's trust boundary hands the SCAFFOLD ``c`` to its train handler."""
SCAFFOLD_DC_PREFIX = "scaffold-dc/"
"""Keys ``scaffold-dc/<parameter>`` of a SCAFFOLD train reply: the site's control variate change ``dc_i``."""
FEDNOVA_A = "fednova-a"
"""Metric of a FedNova train reply: the site's normaliser ``a_i`` (from its local steps and momentum)."""
"""Suffix of the missingness-indicator columns (see :mod:`omopfl.harmonize`)."""

_REQUEST = "omopfl.request"
_SITE = "omopfl.site"
_MOMENTS = "omopfl.moments"
_SCALER = "omopfl.scaler"
_SCALER_VALUES = "omopfl.scaler-values"

_STATUSES = ("ok", "withheld", "error")
_DP_KEYS = ("dp-epsilon", "dp-delta", "dp-features", "dp-low", "dp-high")

REPLY_KEYS: Mapping[str, frozenset[str]] = {
    _SITE: frozenset({"protocol", "site", "status", "code", "feature-names", "dp-epsilon", "dp-delta"}),
    _MOMENTS: frozenset({"persons", "released", "n", "mean", "m2"}),
}
"""Every record name and key a site may send (stats and scaler replies); used by the tests."""

_SITE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # as omopfl.config.SITE_NAME_RE
_HASH_RE = re.compile(r"^[0-9a-f]{0,128}$")
_MAX_NAME = 200


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _record(content: RecordDict, name: str, kind: type, required: bool = True) -> Any:
    records = content.config_records if kind is ConfigRecord else content.metric_records
    if name not in records:
        if required:
            raise CodecError(f"record {name!r} is missing")
        return None
    return records[name]


def _only_records(content: RecordDict, allowed: set[str]) -> None:
    names = set(content.keys())
    extra = names - allowed
    if extra:
        raise CodecError(f"unexpected records {sorted(extra)}")


def _only_keys(record: Mapping[str, Any], name: str, allowed: set[str] | frozenset[str]) -> None:
    extra = set(record.keys()) - set(allowed)
    if extra:
        raise CodecError(f"record {name!r} has unexpected keys {sorted(extra)}")


def _get(record: Mapping[str, Any], name: str, key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in record:
        raise CodecError(f"record {name!r} misses key {key!r}")
    value = record[key]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise CodecError(f"record {name!r} key {key!r} has the wrong type")
    if not isinstance(value, kind):
        raise CodecError(f"record {name!r} key {key!r} has the wrong type")
    return value


def _str_list(record: Mapping[str, Any], name: str, key: str) -> list[str]:
    value = _get(record, name, key, list)
    if not all(isinstance(v, str) and 0 < len(v) <= _MAX_NAME and v.isprintable() for v in value):
        raise CodecError(f"record {name!r} key {key!r} must be a list of short printable names")
    return list(value)


def _num_list(record: Mapping[str, Any], name: str, key: str, *, integer: bool = False) -> list[Any]:
    value = _get(record, name, key, list)
    kinds = (int,) if integer else (int, float)
    if not all(isinstance(v, kinds) and not isinstance(v, bool) for v in value):
        raise CodecError(f"record {name!r} key {key!r} must be a list of {'integers' if integer else 'numbers'}")
    if not integer and not all(math.isfinite(v) for v in value):
        raise CodecError(f"record {name!r} key {key!r} must hold finite numbers")
    return [int(v) for v in value] if integer else [float(v) for v in value]


def _protocol(record: Mapping[str, Any], name: str) -> None:
    if _get(record, name, "protocol", int) != PROTOCOL:
        raise CodecError(f"record {name!r} has protocol version other than {PROTOCOL}")


def _site_name(value: Any) -> str:
    if not isinstance(value, str) or not _SITE_RE.match(value):
        raise CodecError("the site name must be 1-64 letters, digits, '_', '-' or '.'")
    return value


def finite_list(values: Sequence[float] | np.ndarray) -> list[float | None]:
    """The values as JSON numbers, ``None`` where not finite (a result file never holds NaN)."""
    return [float(v) if math.isfinite(float(v)) else None for v in values]


def _floats(values: Sequence[float] | np.ndarray) -> list[float]:
    out = [float(v) for v in values]
    if not all(math.isfinite(v) for v in out):
        raise CodecError("numbers on the wire must be finite")
    return out


# --------------------------------------------------------------------------------------------
# the stats request
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DPRequest:
    """Differential privacy asked of every site: budget and public clipping bounds per feature name.

    Bounds are fixed before any data is seen (from the study's plausible ranges, say), never
    derived from a site's data.  A site computes :func:`omopfl.moment_noise.noisy_moments` with them.
    """

    epsilon: float
    delta: float
    bounds: Mapping[str, tuple[float, float]]

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise CodecError("dp epsilon must be a positive finite number")
        if not 0.0 < self.delta < 1.0:
            raise CodecError("dp delta must be in (0, 1)")
        for name, (low, high) in self.bounds.items():
            if not (isinstance(name, str) and math.isfinite(low) and math.isfinite(high) and low < high):
                raise CodecError("dp bounds must be finite (low, high) pairs with low < high")

    def bounds_for(self, feature_names: Sequence[str]) -> np.ndarray:
        """``(F, 2)`` bounds in the given feature order; ``KeyError`` if a feature has none."""
        return np.array([self.bounds[name] for name in feature_names], dtype=np.float64).reshape(-1, 2)


@dataclass(frozen=True)
class StatsRequest:
    """What the server asks of a site in ``query.stats``."""

    study_hash: str = ""
    dp: DPRequest | None = None


def encode_stats_request(study_hash: str = "", dp: DPRequest | None = None) -> RecordDict:
    """Content of a ``query.stats`` message."""
    if not _HASH_RE.match(study_hash):
        raise CodecError("study hash must be lower-case hex")
    record: dict[str, Any] = {"protocol": PROTOCOL, "study-hash": study_hash}
    if dp is not None:
        names = list(dp.bounds)
        record.update({
            "dp-epsilon": float(dp.epsilon), "dp-delta": float(dp.delta), "dp-features": names,
            "dp-low": _floats([dp.bounds[n][0] for n in names]), "dp-high": _floats([dp.bounds[n][1] for n in names]),
        })
    return RecordDict({_REQUEST: ConfigRecord(record)})


def decode_stats_request(content: RecordDict) -> StatsRequest:
    """Inverse of :func:`encode_stats_request`; :class:`CodecError` on anything else."""
    _only_records(content, {_REQUEST})
    record = _record(content, _REQUEST, ConfigRecord)
    _only_keys(record, _REQUEST, {"protocol", "study-hash", *_DP_KEYS})
    _protocol(record, _REQUEST)
    study_hash = _get(record, _REQUEST, "study-hash", str)
    if not _HASH_RE.match(study_hash):
        raise CodecError("study hash must be lower-case hex")
    present = [k for k in _DP_KEYS if k in record]
    if not present:
        return StatsRequest(study_hash)
    if len(present) != len(_DP_KEYS):
        raise CodecError(f"differential privacy needs all of {list(_DP_KEYS)}")
    names = _str_list(record, _REQUEST, "dp-features")
    low = _num_list(record, _REQUEST, "dp-low")
    high = _num_list(record, _REQUEST, "dp-high")
    if not len(names) == len(low) == len(high) or len(set(names)) != len(names):
        raise CodecError("dp-features, dp-low and dp-high must have one entry per (unique) feature")
    epsilon = _get(record, _REQUEST, "dp-epsilon", (int, float))
    delta = _get(record, _REQUEST, "dp-delta", (int, float))
    dp = DPRequest(float(epsilon), float(delta), {n: (lo, hi) for n, lo, hi in zip(names, low, high, strict=True)})
    return StatsRequest(study_hash, dp)


# --------------------------------------------------------------------------------------------
# site replies
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteReply:
    """A decoded site reply (to ``query.stats`` or ``query.scaler``).

    Attributes
    ----------
    site:
        The name the site gives itself in its adapter.
    status:
        ``ok``, ``withheld`` or ``error``.
    code:
        ``""`` or one of :data:`ERROR_CODES`.
    released:
        The site's released moments (``status == "ok"`` of a stats reply), else None.
    feature_names:
        The site's feature names (stats replies that are not errors), else ``()``.
    dp:
        ``(epsilon, delta)`` when the site added Gaussian noise, else None.
    """

    site: str
    status: str
    code: str = ""
    released: Released | None = None
    feature_names: tuple[str, ...] = ()
    dp: tuple[float, float] | None = None


def encode_site_stats(site: str, released: Released, dp: tuple[float, float] | None = None) -> RecordDict:
    """A site's stats reply: its released moments, or only the fact that it withholds.

    Parameters
    ----------
    site:
        The site's name from its adapter.
    released:
        Output of :func:`omopfl.suppression.suppress`; nothing else is accepted.
    dp:
        ``(epsilon, delta)`` if the moments are differentially private (noise already added).
    """
    if not isinstance(released, Released):
        raise TypeError("encode_site_stats takes the Released output of omopfl.suppression.suppress")
    meta: dict[str, Any] = {
        "protocol": PROTOCOL, "site": _site_name(site), "status": "withheld" if released.withheld else "ok",
        "code": "", "feature-names": list(released.feature_names),
    }
    if dp is not None:
        meta["dp-epsilon"], meta["dp-delta"] = float(dp[0]), float(dp[1])
    content = RecordDict({_SITE: ConfigRecord(meta)})
    if released.withheld:
        return content
    record = released.to_record()
    content[_MOMENTS] = MetricRecord({
        "persons": int(record["persons"]), "released": [int(v) for v in record["released"]],
        "n": [int(v) for v in record["n"]], "mean": _floats(record["mean"]), "m2": _floats(record["m2"]),
    })
    return content


def encode_error(site: str | None, code: str) -> RecordDict:
    """A reply that says only that the site could not answer, with a fixed code."""
    if code not in ERROR_CODES:
        code = "internal"
    name = site if isinstance(site, str) and _SITE_RE.match(site) else ""
    return RecordDict({_SITE: ConfigRecord({"protocol": PROTOCOL, "site": name, "status": "error", "code": code})})


def encode_ack(site: str) -> RecordDict:
    """A site's reply to ``query.scaler``: it has stored the global scaler."""
    return RecordDict({_SITE: ConfigRecord({"protocol": PROTOCOL, "site": _site_name(site), "status": "ok",
                                            "code": ""})})


def decode_site_reply(content: RecordDict) -> SiteReply:
    """Decode and check any site reply against the allow-list; :class:`CodecError` if malformed."""
    _only_records(content, set(REPLY_KEYS))
    meta = _record(content, _SITE, ConfigRecord)
    _only_keys(meta, _SITE, REPLY_KEYS[_SITE])
    _protocol(meta, _SITE)
    status = _get(meta, _SITE, "status", str)
    if status not in _STATUSES:
        raise CodecError(f"record {_SITE!r} key 'status' must be one of {list(_STATUSES)}")
    code = _get(meta, _SITE, "code", str)
    moments = _record(content, _MOMENTS, MetricRecord, required=False)
    if status == "error":
        if code not in ERROR_CODES:
            raise CodecError("an error reply needs a known error code")
        if moments is not None or set(meta.keys()) != {"protocol", "site", "status", "code"}:
            raise CodecError("an error reply carries nothing but the site, status and code")
        site = _get(meta, _SITE, "site", str)
        return SiteReply(_site_name(site) if site else "", status, code)
    site = _site_name(_get(meta, _SITE, "site", str))
    if code:
        raise CodecError("only an error reply has a code")
    dp = None
    if "dp-epsilon" in meta or "dp-delta" in meta:
        dp = (float(_get(meta, _SITE, "dp-epsilon", (int, float))), float(_get(meta, _SITE, "dp-delta", (int, float))))
    if "feature-names" not in meta:  # an acknowledgement of query.scaler
        if status != "ok" or moments is not None or dp is not None:
            raise CodecError("an acknowledgement carries nothing but the site and its status")
        return SiteReply(site, status)
    names = tuple(_str_list(meta, _SITE, "feature-names"))
    if status == "withheld":
        if moments is not None:
            raise CodecError("a withheld reply carries no numbers")
        return SiteReply(site, status, feature_names=names, dp=dp)
    if moments is None:
        raise CodecError(f"record {_MOMENTS!r} is missing")
    _only_keys(moments, _MOMENTS, REPLY_KEYS[_MOMENTS])
    persons = _get(moments, _MOMENTS, "persons", int)
    try:
        released = Released.from_record({
            "feature_names": list(names), "withheld": 0, "persons": int(persons),
            "released": _num_list(moments, _MOMENTS, "released", integer=True),
            "n": _num_list(moments, _MOMENTS, "n", integer=True),
            "mean": _num_list(moments, _MOMENTS, "mean"), "m2": _num_list(moments, _MOMENTS, "m2"),
        })
    except CodecError:
        raise
    except ValueError:
        raise CodecError(f"record {_MOMENTS!r} does not hold valid released moments") from None
    return SiteReply(site, status, released=released, feature_names=names, dp=dp)


def scaler_ack_code(reply: Any, site: str) -> str:
    """``""`` if ``reply`` (a Message or None) is ``site``'s acknowledgement of the global scaler; otherwise why
    not: ``no_reply``, ``flower_error_<code>``, ``malformed`` or the site's own refusal code."""
    if reply is None:
        return "no_reply"
    if reply.has_error():
        return f"flower_error_{int(reply.error.code)}"
    try:
        ack = decode_site_reply(reply.content)
    except CodecError:
        return "malformed"
    return "" if ack.status == "ok" and ack.site == site else (ack.code or "malformed")


# --------------------------------------------------------------------------------------------
# the global scaler (server -> sites)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class GlobalScaler:
    """What every site gets back: the global standardization and what it was computed from.

    Attributes
    ----------
    scaler:
        Global mean and scale per feature (:meth:`omopfl.moments.Scaler.from_moments`).
    n:
        Global number of non-missing values per feature over the contributing sites.
    persons:
        Persons over the contributing sites.
    indicator:
        Per feature, True for a missingness-indicator column (``<feature>__missing``); its
        global mean is the share of persons missing that feature.
    study_hash:
        The study the statistics belong to (``""`` if unchecked).
    """

    scaler: Scaler
    n: np.ndarray
    persons: int
    indicator: tuple[bool, ...]
    study_hash: str = ""

    def __post_init__(self) -> None:
        k = len(self.scaler.feature_names)
        n = np.asarray(self.n, dtype=np.int64)
        if n.shape != (k,) or np.any(n < 0) or len(self.indicator) != k:
            raise CodecError("the global scaler needs one count and one indicator flag per feature")
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "indicator", tuple(bool(v) for v in self.indicator))

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.scaler.feature_names

    @classmethod
    def build(cls, scaler: Scaler, n: Sequence[int] | np.ndarray, persons: int, study_hash: str = "") -> GlobalScaler:
        """With the indicator flags derived from the feature names."""
        return cls(scaler, np.asarray(n), int(persons),
                   tuple(name.endswith(MISSING_SUFFIX) for name in scaler.feature_names), study_hash)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (the same keys as on the wire)."""
        return {"study_hash": self.study_hash, "feature_names": list(self.feature_names),
                "mean": [float(v) for v in self.scaler.mean], "scale": [float(v) for v in self.scaler.scale],
                "n": [int(v) for v in self.n], "persons": int(self.persons),
                "indicator": [int(v) for v in self.indicator]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GlobalScaler:
        """Inverse of :meth:`to_dict`."""
        keys = {"study_hash", "feature_names", "mean", "scale", "n", "persons", "indicator"}
        if not isinstance(data, Mapping) or set(data) != keys:
            raise CodecError(f"a global scaler has exactly the keys {sorted(keys)}")
        try:
            scaler = Scaler(tuple(data["feature_names"]), np.asarray(data["mean"], dtype=np.float64),
                            np.asarray(data["scale"], dtype=np.float64))
        except ValueError:
            raise CodecError("the global scaler's mean and scale are not valid") from None
        return cls(scaler, np.asarray(data["n"]), int(data["persons"]), tuple(bool(v) for v in data["indicator"]),
                   str(data["study_hash"]))


def encode_scaler(global_scaler: GlobalScaler) -> RecordDict:
    """Content of a ``query.scaler`` message."""
    return RecordDict(scaler_record(global_scaler))


def scaler_record(global_scaler: GlobalScaler) -> dict[str, ConfigRecord | MetricRecord]:
    """The scaler's records, to be added to another message (a training round's, say)."""
    d = global_scaler.to_dict()
    return {
        _SCALER: ConfigRecord({"protocol": PROTOCOL, "study-hash": d["study_hash"],
                               "feature-names": d["feature_names"]}),
        _SCALER_VALUES: MetricRecord({"mean": _floats(d["mean"]), "scale": _floats(d["scale"]), "n": d["n"],
                                      "persons": d["persons"], "indicator": d["indicator"]}),
    }


def decode_scaler(content: RecordDict) -> GlobalScaler:
    """Read the global scaler from a message content (other records may be present)."""
    meta = _record(content, _SCALER, ConfigRecord)
    values = _record(content, _SCALER_VALUES, MetricRecord)
    _only_keys(meta, _SCALER, {"protocol", "study-hash", "feature-names"})
    _only_keys(values, _SCALER_VALUES, {"mean", "scale", "n", "persons", "indicator"})
    _protocol(meta, _SCALER)
    study_hash = _get(meta, _SCALER, "study-hash", str)
    if not _HASH_RE.match(study_hash):
        raise CodecError("study hash must be lower-case hex")
    indicator = _num_list(values, _SCALER_VALUES, "indicator", integer=True)
    if any(v not in (0, 1) for v in indicator):
        raise CodecError("indicator flags must be 0 or 1")
    return GlobalScaler.from_dict({
        "study_hash": study_hash, "feature_names": _str_list(meta, _SCALER, "feature-names"),
        "mean": _num_list(values, _SCALER_VALUES, "mean"), "scale": _num_list(values, _SCALER_VALUES, "scale"),
        "n": _num_list(values, _SCALER_VALUES, "n", integer=True),
        "persons": _get(values, _SCALER_VALUES, "persons", int), "indicator": indicator,
    })


# --------------------------------------------------------------------------------------------
# audit
# --------------------------------------------------------------------------------------------


def to_plain(content: RecordDict) -> dict[str, dict[str, Any]]:
    """Every record of a message as plain JSON-safe data (for an audit log of what sites sent).

    Array records are listed by their array names and shapes, not values.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            out[name] = {key: {"shape": list(array.shape), "dtype": array.dtype} for key, array in record.items()}
            continue
        plain: dict[str, Any] = {}
        for key, value in record.items():
            if isinstance(value, bytes):
                plain[key] = {"bytes": len(value)}
            elif isinstance(value, list):
                plain[key] = [v if not isinstance(v, bytes) else {"bytes": len(v)} for v in value]
            else:
                plain[key] = value
        out[name] = plain
    return out


# --------------------------------------------------------------------------------------------
# the study's training settings on the wire
# --------------------------------------------------------------------------------------------


def training_settings(study: Any) -> dict[str, Any]:
    """The settings of a :class:`omopfl.study.StudyConfig` that decide what a site computes, by wire key.

    The coordinator sends these in every ``train``/``evaluate`` config; a site compares them with the
    same function applied to the study it approved, and computes with its own copy.
    """
    import json

    model, training = study.model, study.training
    return {
        "model-kind": str(model.kind), "model-hidden": json.dumps([int(h) for h in model.hidden]),
        "model-dropout": json.dumps([float(d) for d in model.dropout]),
        "rounds": int(training.rounds), "local-epochs": int(training.local_epochs),
        "batch-size": int(training.batch_size), "learning-rate": float(training.learning_rate),
        "proximal-mu": float(training.proximal_mu) if training.strategy == "fedprox" else 0.0,
        "test-fraction": float(training.test_fraction), "seed": int(training.seed),
        "threshold": float(getattr(training, "threshold", 0.5)),
        **covariate_settings(study),
        **local_settings(training.strategy, getattr(training, "optimizer", "adam"), getattr(training, "momentum", 0.0),
                         getattr(training, "weight_decay", 0.0), getattr(training, "local_steps", 0)),
        **split_settings(study),
    }


def local_settings(strategy: str, optimizer: str, momentum: float, weight_decay: float,
                   local_steps: int) -> dict[str, Any]:
    """The local optimizer and site-side strategy settings (issue 14b) by wire key, only those that differ from
    the defaults (Adam, no momentum or weight decay, ``local_epochs``, a server-side strategy), so that other
    studies' messages are unchanged.  ``strategy`` is sent only for FedNova and SCAFFOLD: they change what a
    site computes and releases; FedAvg/FedProx/FedAdam/FedYogi/FedAdagrad are the same at the site."""
    out: dict[str, Any] = {}
    if strategy in ("fednova", "scaffold"):
        out["strategy"] = str(strategy)
    if optimizer != "adam":
        out["optimizer"] = str(optimizer)
    if momentum:
        out["momentum"] = float(momentum)
    if weight_decay:
        out["weight-decay"] = float(weight_decay)
    if local_steps:
        out["local-steps"] = int(local_steps)
    return out


def split_settings(study: Any) -> dict[str, Any]:
    """``split-method`` of a study that fixes its test set (``[split]``, :mod:`omopfl.splits`); empty for the
    default random split (so other studies' messages are unchanged).  The test set itself is part of the
    prepared dataset (covered by the dataset hash), never of a message."""
    split = getattr(study, "split", None)
    if split is None or not split.fixed:
        return {}
    return {"split-method": str(split.method)}


def covariate_settings(study: Any) -> dict[str, Any]:
    """Settings of a covariate study (issue 13b): the number of covariates in its fixed list and the L2
    penalty; empty for a study without ``[covariates] list`` (so other studies' messages are unchanged)."""
    covariates = getattr(study, "covariates", None)
    if covariates is None or covariates.covariate_ids is None:
        return {}
    return {"model-covariates": len(covariates.covariate_ids), "model-l2": float(study.model.l2)}


def audit_entry(reply: Any, message_type: str) -> dict[str, Any]:
    """What the coordinator keeps of a reply for audit: node, type, content and its sha256.

    ``sha256`` is the reply content's Flower object id, the same digest the site's own audit log
    records (:mod:`omopfl.audit`), so the two records can be matched line by line.
    """
    entry: dict[str, Any] = {"node": reply.metadata.src_node_id,
                             "message_type": reply.metadata.message_type or message_type}
    if reply.has_error():
        entry["flower_error_code"] = int(reply.error.code)
    else:
        entry["sha256"] = reply.content.object_id
        entry["content"] = to_plain(reply.content)
    return entry


def reply_refusal(content: RecordDict) -> tuple[str | None, str] | None:
    """``(site, code)`` if a train/evaluate reply is a site's fixed-code refusal or error, else None."""
    if _SITE not in content.config_records:
        return None
    record = content.config_records[_SITE]
    if record.get("status") != "error":
        return None
    code = record.get("code")
    site = record.get("site")
    return (site if isinstance(site, str) and _SITE_RE.match(site) else None,
            code if isinstance(code, str) and code in ERROR_CODES else "malformed")


def study_dp_config(study: Any) -> dict[str, Any]:
    """The run-config keys (``dp-epsilon``, ``dp-delta``, ``dp-bounds``) of a study's ``[privacy]`` statistics
    DP; empty when the study asks none.  Sites compare the request with the study they approved."""
    import json

    privacy = getattr(study, "privacy", None)
    if privacy is None:
        return {}
    if privacy.statistics_epsilon is None:
        return {"secure-aggregation": True} if privacy.secure_aggregation else {}
    return {**({"secure-aggregation": True} if privacy.secure_aggregation else {}),
            "dp-epsilon": float(privacy.statistics_epsilon), "dp-delta": float(privacy.delta),
            "dp-bounds": json.dumps({name: [float(low), float(high)] for name, low, high in privacy.bounds})}


# --------------------------------------------------------------------------------------------
# query.covariates (issue 13b): federated covariate discovery
# --------------------------------------------------------------------------------------------

COVARIATES_QUERY = "query.covariates"
_COVARIATES_REQUEST = "omopfl.covariates-request"
_COVARIATES = "omopfl.covariates"
MAX_COVARIATE_IDS = 1_000_000


@dataclass(frozen=True)
class CovariatesRequest:
    """``query.covariates``: the study, and the fewest persons the coordinator asks per covariate (a site
    uses the larger of that and its own ``min_cell_count``)."""

    study_hash: str
    min_persons: int = 0


def encode_covariates_request(study_hash: str, min_persons: int = 0) -> RecordDict:
    """Content of a ``query.covariates`` message."""
    if not _HASH_RE.match(study_hash):
        raise CodecError("study hash must be lower-case hex")
    return RecordDict({_COVARIATES_REQUEST: ConfigRecord({"protocol": PROTOCOL, STUDY_HASH_KEY: study_hash,
                                                          "min-persons": int(min_persons)})})


def decode_covariates_request(content: RecordDict) -> CovariatesRequest:
    """Inverse of :func:`encode_covariates_request`; :class:`CodecError` on anything else."""
    _only_records(content, {_COVARIATES_REQUEST})
    record = _record(content, _COVARIATES_REQUEST, ConfigRecord)
    _only_keys(record, _COVARIATES_REQUEST, {"protocol", STUDY_HASH_KEY, "min-persons"})
    _protocol(record, _COVARIATES_REQUEST)
    study_hash = _get(record, _COVARIATES_REQUEST, STUDY_HASH_KEY, str)
    if not _HASH_RE.match(study_hash):
        raise CodecError("study hash must be lower-case hex")
    min_persons = _get(record, _COVARIATES_REQUEST, "min-persons", int)
    if min_persons < 0:
        raise CodecError("min-persons must not be negative")
    return CovariatesRequest(study_hash, int(min_persons))


def encode_covariates_reply(site: str, covariate_ids: Sequence[int]) -> RecordDict:
    """A site's ``query.covariates`` reply: the covariate ids it releases (no counts)."""
    ids = sorted({int(c) for c in covariate_ids})
    return RecordDict({_COVARIATES: ConfigRecord({"protocol": PROTOCOL, "site": _site_name(site), "status": "ok",
                                                  "covariate-ids": ids})})


def decode_covariates_reply(content: RecordDict) -> tuple[str, list[int]]:
    """``(site, covariate ids)`` of a ``query.covariates`` reply; :class:`CodecError` if it is anything else
    (an error reply decodes with :func:`decode_site_reply`)."""
    _only_records(content, {_COVARIATES})
    record = _record(content, _COVARIATES, ConfigRecord)
    _only_keys(record, _COVARIATES, {"protocol", "site", "status", "covariate-ids"})
    _protocol(record, _COVARIATES)
    if _get(record, _COVARIATES, "status", str) != "ok":
        raise CodecError("a covariates reply has status ok")
    ids = _num_list(record, _COVARIATES, "covariate-ids", integer=True)
    if len(ids) > MAX_COVARIATE_IDS or any(c <= 0 for c in ids) or len(set(ids)) != len(ids):
        raise CodecError("covariate-ids must be distinct positive ids")
    return _site_name(_get(record, _COVARIATES, "site", str)), ids
