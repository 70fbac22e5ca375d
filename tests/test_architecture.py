"""Package architecture: no import cycle among omopfl's modules (issue 15).

Every ``omopfl/**/*.py`` is parsed with ``ast`` and every import is counted, including imports inside
functions (a function-local import hides a cycle from Python at import time, not from the design).
"""

from __future__ import annotations

import ast
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
