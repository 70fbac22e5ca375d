"""The site's own record of what it sent: where its audit log is, how a reply is described there, and how many
replies of a kind it already sent in a run (:mod:`omopfl.audit` writes and reads the log)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from omopfl import audit, policy
from omopfl.config import SiteConfig

__all__ = ["audit_path", "plain_value", "describe", "sent_replies"]


def sent_replies(site: SiteConfig, run_id: int, message_type: str) -> int:
    """Replies of this type the site already sent in this run (from its audit log)."""
    return sum(1 for e in audit.read(audit_path(site), run_id=run_id)
               if e.get("message_type") == message_type and e.get("outcome") == "sent")


def audit_path(site: SiteConfig) -> Path:
    """The site's audit log (in its state folder)."""
    return policy.state_dir(site) / audit.AUDIT_FILE


def plain_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"bytes": len(value)}
    if isinstance(value, list):
        return [plain_value(v) for v in value]
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
                            "values": {k: plain_value(v) for k, v in record.items()}})
        elif isinstance(record, ConfigRecord):
            records.append({"name": name, "kind": "config", "keys": list(record.keys()),
                            "values": {k: plain_value(v) for k, v in record.items()}})
    return records, wire_bytes(content)
