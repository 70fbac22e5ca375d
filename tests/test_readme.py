"""The README's module map is current: it names every module of the package, and only those (issue 15)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _map_block() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## How omopfl is built", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```\n(.*?)```", section, re.S)
    return next(b for b in blocks if b.startswith("omopfl/"))


def _named(block: str) -> set[str]:
    """Module paths the map names: ``name.py`` under ``omopfl/``, ``federation/...`` entries nested."""
    named, folder = set(), ""
    for line in block.splitlines():
        match = re.match(r"^(\s*)([\w/]+)(\.py)?\s", line + " ")
        if not match:
            continue
        indent, name, py = len(match.group(1)), match.group(2), match.group(3)
        if indent == 0:
            folder = ""
            continue
        if not py and name.endswith("/"):
            folder = name if indent == 2 else folder
            continue
        if py:
            named.add((folder if indent > 2 else "") + name + ".py")
    return named


def test_the_module_map_names_every_module():
    package = ROOT / "omopfl"
    modules = {str(p.relative_to(package)) for p in package.rglob("*.py")
               if p.name != "__init__.py" and "__pycache__" not in p.parts}
    named = _named(_map_block())
    assert sorted(modules - named) == [], "modules missing from the README's module map"
    assert sorted(named - modules) == [], "the README's module map names modules that do not exist"


def test_the_map_parser_reads_nesting():
    block = "omopfl/\n  a.py   x\n  federation/\n    b.py   y\n    site/c.py  z\nsql/    q\n"
    assert _named(block) == {"a.py", "federation/b.py", "federation/site/c.py"}
