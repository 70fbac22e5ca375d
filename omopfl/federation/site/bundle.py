"""The code gate: a coordinator's app bundle may only name omopfl's own ClientApp.

omopfl's ClientApp process (:mod:`omopfl.federation.site.runtime`) checks every task's bundle with
:func:`check_bundle` before the message is served; nothing in the bundle is installed, extracted or imported.
"""

from __future__ import annotations

import io
import tomllib
import zipfile

__all__ = ["COMPONENT", "ALLOWED_FILES", "MAX_PYPROJECT_BYTES", "check_bundle"]


COMPONENT = "omopfl.federation.site.app:app"
"""The only ClientApp component a site runs (what omopfl's own app bundles name)."""
ALLOWED_FILES = frozenset({"pyproject.toml", ".info/CONTENT"})
"""What an app bundle may hold: its pyproject and Flower's content manifest, nothing else."""
MAX_PYPROJECT_BYTES = 1 << 20


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
