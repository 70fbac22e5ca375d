"""Package architecture: no import cycle among omopfl's modules (issue 15).

Every ``omopfl/**/*.py`` is parsed with ``ast`` and every import is counted, including imports inside
functions (a function-local import hides a cycle from Python at import time, not from the design).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "omopfl"

# Known cycles: none (issue 15 removed the last ones, all in omopfl/federation/).  Do not add to this list:
# any cycle fails the test.
KNOWN_CYCLES: list[frozenset[str]] = []


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str | None:
    if node.level == 0:
        return node.module
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at module level or inside functions and classes.

    Imports under ``if TYPE_CHECKING:`` are left out: they name types for annotations and never run.
    """
    found: list[ast.Import | ast.ImportFrom] = []
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            pending.extend(node.orelse)
            continue
        pending.extend(ast.iter_child_nodes(node))
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the omopfl modules it imports (anywhere in the file)."""
    files = {_module_name(p): p for p in PACKAGE_DIR.rglob("*.py")}
    modules = set(files)

    def known(name: str) -> str | None:
        # The longest prefix of ``name`` that is an omopfl module (``omopfl.db.connect`` -> ``omopfl.db``).
        parts = name.split(".")
        while parts:
            candidate = ".".join(parts)
            if candidate in modules:
                return candidate
            parts.pop()
        return None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node)
                if base is None:
                    continue
                # ``from omopfl import db`` imports the module omopfl.db, not just the package.
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            for target in targets:
                if not (target == "omopfl" or target.startswith("omopfl.")):
                    continue
                found = known(target)
                if found is None or found == module:
                    continue
                # ``from omopfl.x import y`` where y is a module: count the edge to y, not also to x.
                graph[module].add(found)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Tarjan's algorithm; the components with more than one module (or a self-loop) are cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result: list[frozenset[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return result


def _a_cycle(graph: dict[str, set[str]], component: frozenset[str]) -> list[str]:
    """The shortest cycle through the first module of ``component``, for the failure message."""
    start = min(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if w not in previous:
                    previous[w] = v
                    following.append(w)
        frontier = following
    return sorted(component)


def test_the_graph_sees_function_local_relative_and_package_imports(tmp_path, monkeypatch):
    package = tmp_path / "omopfl"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from omopfl.b import g\n")
    (package / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from omopfl import a\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "c.py").write_text("from .. import a\nimport omopfl.sub.d\n")
    (package / "sub" / "d.py").write_text("from ..sub import c\n")
    monkeypatch.setitem(globals(), "PACKAGE_DIR", package)
    graph = import_graph()
    assert graph["omopfl.a"] == {"omopfl.b"}  # function-local
    assert graph["omopfl.b"] == set()  # TYPE_CHECKING only
    assert graph["omopfl.sub"] == set()
    # relative (``from .. import a`` runs the package too), and absolute dotted
    assert graph["omopfl.sub.c"] == {"omopfl", "omopfl.a", "omopfl.sub.d"}
    assert graph["omopfl.sub.d"] == {"omopfl.sub", "omopfl.sub.c"}
    cycles = strongly_connected(graph)
    assert cycles == [frozenset({"omopfl.sub.c", "omopfl.sub.d"})]
    assert _a_cycle(graph, cycles[0]) == ["omopfl.sub.c", "omopfl.sub.d", "omopfl.sub.c"]


def test_the_real_graph_has_the_function_local_imports():
    graph = import_graph()
    assert "omopfl.harmonize" in graph["omopfl.study"]  # imported inside functions only
    assert "omopfl.study" not in graph["omopfl.harmonize"]  # imported under TYPE_CHECKING only


def test_no_import_cycle_in_omopfl():
    graph = import_graph()
    cycles = strongly_connected(graph)
    known = set(KNOWN_CYCLES)
    new = [c for c in cycles if c not in known]
    message = "\n".join(" -> ".join(_a_cycle(graph, c)) + f"   (component: {sorted(c)})" for c in new)
    assert not new, f"import cycles in omopfl:\n{message}"
    gone = [sorted(c) for c in known if c not in set(cycles)]
    assert not gone, f"known cycles no longer present, remove them from KNOWN_CYCLES: {gone}"


SQL_DIR = PACKAGE_DIR.parent / "sql"


def test_static_queries_are_files_read_through_sql_text():
    """sql/*.sql: one statement each, used by the package through omopfl.db.sql_text."""
    from omopfl.db import SQL_DIR as package_sql_dir
    from omopfl.db import sql_text

    assert package_sql_dir.resolve() == SQL_DIR.resolve()
    source = "\n".join(p.read_text(encoding="utf-8") for p in PACKAGE_DIR.rglob("*.py"))
    files = sorted(SQL_DIR.glob("*.sql"))
    assert files
    for path in files:
        text = sql_text(path.stem)
        statement = text.split(None, 1)[0].upper()
        assert statement in {"SELECT", "INSERT", "DELETE", "CREATE", "DROP", "ANALYZE"}, path.name
        assert ";" not in text and "--" not in text, path.name
        assert f'sql_text("{path.stem}"' in source, f"{path.name} is not used through sql_text"
    assert sql_text("schema_exists") is sql_text("schema_exists")  # read once


def _targets(node: ast.Assign | ast.AnnAssign) -> list[ast.expr]:
    return node.targets if isinstance(node, ast.Assign) else [node.target]


def test_the_cdm_checks_share_one_event_table_list():
    """sites check and validate read the event tables from omopfl.cdm (issue 15: checks written once)."""
    import omopfl.cdm
    import omopfl.conformance
    import omopfl.sites

    defined = [
        _module_name(p)
        for p in PACKAGE_DIR.rglob("*.py")
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
        if isinstance(node, (ast.Assign, ast.AnnAssign))
        and any(isinstance(t, ast.Name) and t.id == "EVENT_TABLES" for t in _targets(node))
    ]
    assert defined == ["omopfl.cdm"]
    assert omopfl.sites.EVENT_TABLES is omopfl.conformance.EVENT_TABLES is omopfl.cdm.EVENT_TABLES


# --------------------------------------------------------------------------------------------
# Flower's internals: one module touches them (issue 15)
# --------------------------------------------------------------------------------------------

FLOWER_INTERNALS = PACKAGE_DIR / "federation" / "flower_internals.py"
FLOWER_PUBLIC = ("flwr.app", "flwr.clientapp", "flwr.serverapp", "flwr.serverapp.strategy", "flwr.simulation")
"""Flower's public API: what every module but ``flower_internals`` may import."""


def flower_private_uses(path: Path) -> list[str]:
    """What ``path`` uses of Flower beyond its public API: imports of other ``flwr`` modules (``import flwr``
    too), strings naming them (monkeypatch targets), private attributes of names imported from Flower, and
    writes through ``metadata.__dict__``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[str] = []
    flower_names: set[str] = set()
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "flwr" and alias.name not in FLOWER_PUBLIC:
                    found.append(f"line {node.lineno}: import {alias.name}")
                elif alias.name.split(".")[0] == "flwr":
                    flower_names.add(alias.asname or alias.name.split(".")[0])
        elif node.module and node.level == 0 and node.module.split(".")[0] == "flwr":
            if node.module not in FLOWER_PUBLIC:
                found.append(f"line {node.lineno}: from {node.module} import ...")
            flower_names.update(alias.asname or alias.name for alias in node.names)
    private_module = re.compile(r"\bflwr\.(common|supercore|supernode|superlink|superexec|proto|server|client|cli|"
                                r"compat)\b")
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and private_module.search(node.value):
            found.append(f"line {node.lineno}: names {private_module.search(node.value).group(0)}")
        if isinstance(node, ast.Attribute):
            if node.attr == "__dict__" and isinstance(node.value, ast.Attribute) and node.value.attr == "metadata":
                found.append(f"line {node.lineno}: writes metadata.__dict__")
            if (node.attr.startswith("_") and not node.attr.startswith("__") and isinstance(node.value, ast.Name)
                    and node.value.id in flower_names):
                found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return sorted(found, key=lambda use: int(use.split(":")[0].split()[1]))


def test_the_flower_check_sees_private_uses(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import flwr\nfrom flwr.app import Message\nfrom flwr.common.serde import x\n"
                      "def f(m):\n    from flwr.serverapp.strategy import FedAvg\n    m.metadata.__dict__['a'] = 1\n"
                      "    Message._x = 2\n    FedAvg.aggregate_train\n"
                      "    patch('flwr.supercore.task_identity.TaskIdentity')\n    'see flwr.app.Message'\n")
    assert [u.split(":")[0] for u in flower_private_uses(sample)] == [
        "line 1", "line 3", "line 6", "line 7", "line 9"]


def test_only_flower_internals_touches_flowers_private_names():
    """omopfl (and its tests and benches) use Flower's public API; the internals are in one module, behind one
    version gate, and that module imports nothing of omopfl."""
    root = PACKAGE_DIR.parent
    files = [p for d in ("omopfl", "tests", "bench", "examples", "scripts") for p in (root / d).rglob("*.py")]
    uses = {str(p.relative_to(root)): flower_private_uses(p) for p in files
            if p not in (FLOWER_INTERNALS, Path(__file__).resolve())}  # (this file's samples name private modules)
    assert not {k: v for k, v in uses.items() if v}
    assert flower_private_uses(FLOWER_INTERNALS)  # the internals are there
    assert import_graph()["omopfl.federation.flower_internals"] == set()
    text = FLOWER_INTERNALS.read_text(encoding="utf-8")
    assert text.count("CHECKED_FLOWER_VERSIONS = ") == 1
    others = [p for p in PACKAGE_DIR.rglob("*.py") if p != FLOWER_INTERNALS
              and re.search(r"(FLOWER_VERSIONS|BACKOFF_SECONDS)\s*=", p.read_text(encoding="utf-8"))]
    assert not others, others


def test_site_and_coordinator_sides_share_only_the_wire():
    """The site side imports nothing of the coordinator's and the coordinator nothing of the site's: what they
    share is the wire format (the codec modules), the run config and the Flower internals."""
    graph = import_graph()
    site, coordinator = "omopfl.federation.site", "omopfl.federation.coordinator"
    crossings = {m: sorted(t for t in targets if t.startswith(other))
                 for side, other in ((site, coordinator), (coordinator, site))
                 for m, targets in graph.items() if m.startswith(side)}
    assert len([m for m in graph if m.startswith(site)]) >= 9
    assert len([m for m in graph if m.startswith(coordinator)]) >= 9
    assert not {m: t for m, t in crossings.items() if t}
