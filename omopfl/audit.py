"""The site's own record of everything it sent: an append-only, hash-chained JSON-lines log.

Every reply a site's ClientApp sends (released statistics, scaler acknowledgements, model weights,
evaluation metrics, refusals) is appended here *before* it leaves the site
(:func:`omopfl.federation.site.app.serve`).  One line per reply::

    {"seq": 7, "time": "2026-12-02T08:00:00.123456+00:00", "run_id": 42, "site": "site_a",
     "study_hash": "…", "message_type": "train", "server_round": 3, "outcome": "sent" | "refused",
     "code": "" | "study_not_approved" | …, "records": [{"name": "arrays", "kind": "array",
     "keys": ["linear.weight", …], "arrays": [{"key": "linear.weight", "shape": [1, 9],
     "dtype": "float32"}]}, {"name": "metrics", "kind": "metric", "keys": […], "values": {…}}],
     "bytes": 1234, "sha256": "…", "prev": "<sha256 of the previous line>"}

``sha256`` is the content address Flower gives the reply (``RecordDict.object_id``: sha256 over the
reply's serialized records, each child by its own id), so the coordinator's copy of a reply can be
matched to this line without trusting anyone.  ``prev`` chains the lines: editing or deleting a line
breaks :func:`verify`.  Metric and config values (released numbers and codes) are kept in full;
arrays (model weights) by key, shape and dtype only.

Several processes of one site append to the same file (forked ClientApp tasks); each append holds an
exclusive ``flock`` on the file, reads the last line's hash and writes one line with ``O_APPEND``.

Written by hand because it is omopfl's own record format; it imports nothing of Flower.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omopfl.errors import ConfigError

__all__ = ["AUDIT_FILE", "append", "read", "verify", "line_hash"]

AUDIT_FILE = "audit.jsonl"
GENESIS = "0" * 64


def line_hash(line: bytes) -> str:
    """sha256 of one log line (without its newline): the next line's ``prev``."""
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def _last_line(fd: int) -> bytes:
    size = os.lseek(fd, 0, os.SEEK_END)
    if size == 0:
        return b""
    block = min(size, 1 << 16)
    while True:
        os.lseek(fd, size - block, os.SEEK_SET)
        data = os.read(fd, block)
        stripped = data.rstrip(b"\n")
        cut = stripped.rfind(b"\n")
        if cut >= 0 or block == size:
            return stripped[cut + 1:]
        block = min(size, block * 4)


def append(path: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Append ``entry`` (plus ``seq``, ``time``, ``prev``) to the log at ``path``; returns what was written."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        last = _last_line(fd)
        prev, seq = GENESIS, 1
        if last:
            prev = line_hash(last)
            with contextlib.suppress(ValueError, KeyError, TypeError):
                seq = int(json.loads(last)["seq"]) + 1
        record = {"seq": seq, "time": dt.datetime.now(dt.UTC).isoformat(), **entry, "prev": prev}
        line = json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False).encode() + b"\n"
        os.write(fd, line)
        os.fsync(fd)
        return record
    finally:
        os.close(fd)


def _lines(path: Path) -> Iterator[bytes]:
    if not path.is_file():
        return
    with path.open("rb") as fh:
        for raw in fh:
            if raw.strip():
                yield raw.rstrip(b"\n")


def read(path: Path, *, run_id: int | None = None) -> list[dict[str, Any]]:
    """The log's entries (of one run if ``run_id`` is given), oldest first."""
    entries = []
    for number, line in enumerate(_lines(path), start=1):
        try:
            entry = json.loads(line)
        except ValueError:
            raise ConfigError(f"{path}: line {number} is not JSON: the audit log was edited") from None
        if run_id is None or entry.get("run_id") == run_id:
            entries.append(entry)
    return entries


def verify(path: Path) -> tuple[bool, int]:
    """(whether every line's ``prev`` is the hash of the line before, number of lines)."""
    prev, count = GENESIS, 0
    for line in _lines(path):
        count += 1
        try:
            if json.loads(line).get("prev") != prev:
                return False, count
        except ValueError:
            return False, count
        prev = line_hash(line)
    return True, count
