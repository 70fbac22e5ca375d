"""Atomic file writes: a temporary file in the target's folder, flushed, then renamed into place.

A reader (another process, a resumed run, the live run view) sees either the old file or the new one,
never half of one; an interrupted write leaves the old file and no temporary behind.  The one
implementation every writer of a run directory, checkpoint, scaler, approval or state file uses.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["write_bytes", "write_json"]


def write_bytes(path: str | Path, data: bytes, *, private: bool = False, fsync: bool = False) -> None:
    """Replace ``path`` with ``data`` atomically.

    Parameters
    ----------
    path:
        The target file; its folder is created (mode 0700 when ``private``).
    private:
        A site's secret or state (keys, control variates): the folder is 0700 and the file 0600.
    fsync:
        Flush to disk before the rename (approvals: survive a power cut).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, **({"mode": 0o700} if private else {}))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:  # mkstemp's file is 0600: readable by the site's user only
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any, *, private: bool = False, fsync: bool = False, indent: int | None = 1,
               default: Any = None, allow_nan: bool = False) -> None:
    """Replace ``path`` with ``data`` as JSON atomically (:func:`write_bytes`); NaN is refused unless allowed."""
    text = json.dumps(data, indent=indent, default=default, allow_nan=allow_nan)
    write_bytes(path, text.encode(), private=private, fsync=fsync)

