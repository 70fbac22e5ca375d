"""The coordinator's Flower ServerApp for federated statistics.

It imports the wire format (:mod:`omopfl.federation.codec`), the pure statistics
(:mod:`omopfl.moments`) and Flower, nothing that reads patient data: no ``omopfl.prepare``,
``features``, ``linking``, ``db``, no database driver (``tests/test_federated_stats.py`` checks).

``main(grid, context)``:

1. waits until ``min-sites`` SuperNodes are connected (at most ``wait-seconds``);
2. sends ``query.stats`` to every node and waits for the replies (at most ``timeout`` seconds);
3. merges the released moments of the sites that contributed (Chan et al., :func:`omopfl.moments.merge_all`,
   in site-name order) into the global :class:`omopfl.moments.Scaler`; logs the sites that withheld
   (by the name each site reports) and the ones that failed (by their fixed error code);
4. sends the global scaler to every site whose features match (``query.scaler``) unless
   ``send-scaler`` is false, and collects their acknowledgements;
5. writes the result JSON to ``result-path`` (and, if ``audit-path`` is set, every reply's full
   content as received, for audit).

Run config (kebab-case, as in ``[tool.flwr.app.config]``)
----------------------------------------------------------
``result-path`` (str, required), ``audit-path`` (str, ``""``: none), ``study-hash`` (str, ``""``:
not checked), ``min-sites`` (int, 1), ``min-contributing`` (int, 1), ``expected-sites`` (int, 0: ``min-sites``;
how many SuperNodes to wait for before starting), ``wait-seconds`` (float, 120),
``timeout`` (float, 600), ``send-scaler`` (bool, true), ``dp-epsilon`` (float, 0: no noise),
``dp-delta`` (float, 1e-6), ``dp-bounds`` (str: JSON object ``{"feature": [low, high], ...}``).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from omopfl.atomic import write_json
from omopfl.errors import ConfigError
from omopfl.federation import codec
from omopfl.federation.run_config import STATS_CONFIG
from omopfl.moments import Scaler, finalize, merge_all

__all__ = ["app", "Settings", "federated_statistics", "RESULT_VERSION"]

RESULT_VERSION = 1

_log = logging.getLogger("flwr.omopfl")

app = ServerApp()


@dataclass(frozen=True)
class Settings:
    """The server's settings, read from the run config (:meth:`from_run_config`; the defaults are
    :data:`omopfl.federation.run_config.STATS_CONFIG`'s)."""

    result_path: str
    audit_path: str
    study_hash: str
    min_sites: int
    expected_sites: int
    min_contributing: int
    wait_seconds: float
    timeout: float
    send_scaler: bool
    dp: codec.DPRequest | None
    secure_aggregation: bool
    poll_interval: float = field(default=0.5, repr=False)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> Settings:
        def get(key: str, kind: type | tuple[type, ...]) -> Any:
            value = run_config.get(key, STATS_CONFIG[key])
            if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
                raise ConfigError(f"run config {key} has the wrong type")
            if not isinstance(value, kind):
                raise ConfigError(f"run config {key} has the wrong type")
            return value

        epsilon = float(get("dp-epsilon", (int, float)))
        dp = None
        if epsilon > 0:
            try:
                raw = json.loads(get("dp-bounds", str) or "{}")
            except json.JSONDecodeError:
                raise ConfigError("run config dp-bounds must be a JSON object {feature: [low, high]}") from None
            if not isinstance(raw, dict) or not raw:
                raise ConfigError("run config dp-bounds must be a JSON object {feature: [low, high]}")
            bounds = {str(k): (float(v[0]), float(v[1])) for k, v in raw.items()}
            dp = codec.DPRequest(epsilon, float(get("dp-delta", (int, float))), bounds)
        settings = cls(
            result_path=get("result-path", str), audit_path=get("audit-path", str),
            study_hash=get("study-hash", str), min_sites=int(get("min-sites", int)),
            expected_sites=int(get("expected-sites", int)),
            min_contributing=int(get("min-contributing", int)),
            wait_seconds=float(get("wait-seconds", (int, float))),
            timeout=float(get("timeout", (int, float))), send_scaler=bool(get("send-scaler", bool)),
            dp=dp, secure_aggregation=bool(get("secure-aggregation", bool)),
        )
        if settings.min_sites < 1 or settings.min_contributing < 1:
            raise ConfigError("run config min-sites and min-contributing must be at least 1")
        return settings


def _wait_for_nodes(grid: Grid, settings: Settings) -> list[int]:
    deadline = time.monotonic() + settings.wait_seconds
    wanted = max(settings.min_sites, settings.expected_sites)
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted or time.monotonic() >= deadline:
            return nodes
        time.sleep(settings.poll_interval)


def _exchange(grid: Grid, nodes: list[int], content_for, message_type: str, timeout: float,
              audit: list[dict[str, Any]] | None) -> dict[int, Message]:
    messages = [Message(content_for(node), dst_node_id=node, message_type=message_type, group_id=message_type)
                for node in nodes]
    replies = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        replies[node] = reply
        if audit is not None:
            audit.append(codec.audit_entry(reply, message_type))
    return replies


def suppressed_features(replies: list[codec.SiteReply]) -> dict[str, list[str]]:
    """Per contributing site, the features its release rule withheld (small cells: a sex level, a
    category, a rare concept); sites that released every feature are left out."""
    out: dict[str, list[str]] = {}
    for reply in replies:
        if reply.released is None:
            continue
        withheld = [name for name, ok in zip(reply.released.feature_names, reply.released.released, strict=True)
                    if not ok]
        if withheld:
            out[reply.site] = withheld
    return out


def federated_statistics(grid: Grid, settings: Settings) -> dict[str, Any]:
    """Run the stats phase on any Grid and return the result (also written to ``settings.result_path``).

    Returns
    -------
    dict
        ``global`` (``persons``, per-feature ``feature_names``, ``n``, ``mean``, ``std`` (ddof=1;
        None where undefined), ``scale``), ``scaler`` (:meth:`codec.GlobalScaler.to_dict`, or None
        when fewer than ``min-contributing`` sites contributed), ``sites`` (``contributing``,
        ``withheld``, ``failed`` as ``{"site", "node", "code"}``, ``no_reply`` node ids,
        ``scaler_acknowledged``, ``persons`` per contributing site, ``suppressed``: per site the
        features its release rule withheld), ``seconds``.
    """
    started = time.monotonic()
    audit: list[dict[str, Any]] | None = [] if settings.audit_path else None
    nodes = _wait_for_nodes(grid, settings)
    waited = time.monotonic() - started
    if len(nodes) < settings.min_sites:
        _log.warning("omopfl stats: only %d of %d sites connected within %.0f s; going on with them",
                     len(nodes), settings.min_sites, settings.wait_seconds)
    if settings.secure_aggregation:  # the study asks for masked sums: omopfl.federation.coordinator.secure_statistics
        from omopfl.federation.coordinator import secure_statistics as secure_stats

        return secure_stats.secure_statistics(grid, settings, nodes, audit, started, waited)
    request = codec.encode_stats_request(settings.study_hash, settings.dp)
    replies = _exchange(grid, nodes, lambda _node: request, codec.STATS_QUERY, settings.timeout, audit)
    stats_seconds = time.monotonic() - started - waited

    failed: list[dict[str, Any]] = []
    decoded: dict[int, codec.SiteReply] = {}
    for node in nodes:
        reply = replies.get(node)
        if reply is None:
            continue
        if reply.has_error():
            # Flower's own error (the app could not run); its reason text is not read.
            failed.append({"site": None, "node": node, "code": f"flower_error_{int(reply.error.code)}"})
            continue
        try:
            site_reply = codec.decode_site_reply(reply.content)
        except codec.CodecError as exc:
            _log.warning("omopfl stats: node %d sent a malformed reply (%s)", node, exc)
            failed.append({"site": None, "node": node, "code": "malformed"})
            continue
        if site_reply.status == "error":
            failed.append({"site": site_reply.site or None, "node": node, "code": site_reply.code})
        elif site_reply.released is None and site_reply.status == "ok":
            failed.append({"site": site_reply.site, "node": node, "code": "malformed"})
        else:
            decoded[node] = site_reply
    no_reply = [node for node in nodes if node not in replies]

    # one reply per site name (two nodes with the same site would count persons twice)
    by_site = Counter(r.site for r in decoded.values())
    for node, r in list(decoded.items()):
        if by_site[r.site] > 1:
            failed.append({"site": r.site, "node": node, "code": "duplicate_site"})
            del decoded[node]
    # the features most sites report (ties: those of the alphabetically first site)
    reference: tuple[str, ...] = ()
    if decoded:
        counts = Counter(r.feature_names for r in decoded.values())
        first = {names: min(r.site for r in decoded.values() if r.feature_names == names) for names in counts}
        reference = min(counts, key=lambda names: (-counts[names], first[names]))
        for node, r in list(decoded.items()):
            if r.feature_names != reference:
                failed.append({"site": r.site, "node": node, "code": "feature_mismatch"})
                del decoded[node]

    ordered = sorted(decoded.items(), key=lambda item: item[1].site)
    contributing = [(node, r) for node, r in ordered if r.status == "ok"]
    withheld = [(node, r) for node, r in ordered if r.status == "withheld"]
    for _, r in withheld:
        _log.info("omopfl stats: site %s withheld its statistics (fewer persons than its min_cell_count)", r.site)
    for entry in failed:
        _log.warning("omopfl stats: %s: %s (node %d did not contribute: %s)", entry["site"] or "?",
                     codec.ERROR_TEXT.get(entry["code"], entry["code"]), entry["node"], entry["code"])
    if no_reply:
        _log.warning("omopfl stats: %d node(s) did not reply within %.0f s", len(no_reply), settings.timeout)

    result: dict[str, Any] = {
        "version": RESULT_VERSION,
        "study_hash": settings.study_hash,
        "dp": None if settings.dp is None else {"epsilon": settings.dp.epsilon, "delta": settings.dp.delta},
        "global": None,
        "scaler": None,
        "sites": {
            "connected": len(nodes),
            "contributing": [r.site for _, r in contributing],
            "withheld": [r.site for _, r in withheld],
            "failed": sorted(failed, key=lambda e: (e["site"] or "", e["node"])),
            "no_reply": no_reply,
            "persons": {r.site: int(r.released.persons) for _, r in contributing if r.released is not None},
            "scaler_acknowledged": [],
            "scaler_nodes": {},
            "suppressed": suppressed_features([r for _, r in contributing]),
        },
    }
    scaler_seconds = 0.0
    if contributing:
        merged = merge_all([r.released.to_moments() for _, r in contributing if r.released is not None],
                           reference)
        mean, std = finalize(merged, ddof=1)
        scaler = Scaler.from_moments(merged, ddof=1)
        result["global"] = {
            "persons": int(merged.persons), "feature_names": list(reference), "n": [int(v) for v in merged.n],
            "mean": codec.finite_list(mean), "std": codec.finite_list(std), "scale": [float(v) for v in scaler.scale],
        }
        if len(contributing) >= settings.min_contributing:
            global_scaler = codec.GlobalScaler.build(scaler, merged.n, merged.persons, settings.study_hash)
            result["scaler"] = global_scaler.to_dict()
            if settings.send_scaler:
                t0 = time.monotonic()
                targets = [node for node, _ in ordered]
                content = codec.encode_scaler(global_scaler)
                acks = _exchange(grid, targets, lambda _node: content, codec.SCALER_QUERY, settings.timeout, audit)
                acknowledged = []
                for node in targets:
                    site = decoded[node].site
                    code = codec.scaler_ack_code(acks.get(node), site)
                    if code:
                        _log.warning("omopfl stats: site %s did not take the global scaler: %s", site, code)
                    else:
                        acknowledged.append(site)
                        result["sites"]["scaler_nodes"][site] = int(node)
                result["sites"]["scaler_acknowledged"] = acknowledged
                scaler_seconds = time.monotonic() - t0
        else:
            _log.warning("omopfl stats: %d site(s) contributed, fewer than min-contributing %d: no scaler",
                         len(contributing), settings.min_contributing)
    else:
        _log.warning("omopfl stats: no site contributed statistics")
    result["seconds"] = {"wait_for_sites": round(waited, 3), "stats": round(stats_seconds, 3),
                         "scaler": round(scaler_seconds, 3), "total": round(time.monotonic() - started, 3)}
    _log.info("omopfl stats: %d contributing, %d withheld, %d failed, %d without reply",
              len(contributing), len(withheld), len(failed), len(no_reply))
    if settings.result_path:
        write_json(settings.result_path, result)
    if audit is not None:
        write_json(settings.audit_path, {"version": RESULT_VERSION, "replies": audit})
    return result


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point: settings from the run config, result to ``result-path``."""
    settings = Settings.from_run_config(dict(context.run_config))
    if not settings.result_path:
        raise ConfigError("run config result-path is required")
    federated_statistics(grid, settings)
