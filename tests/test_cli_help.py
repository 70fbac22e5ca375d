"""The ``omopfl`` command tree: every command and option where the CLI split (issue 15) left them.

The commands are declared in modules named for their audience (``omopfl/cli_*.py``) and registered by
``omopfl/cli.py``; this test walks the click tree typer builds and compares the command paths, their
order (the order ``omopfl --help`` lists them) and each command's parameters with :data:`COMMANDS`.
Rendered help text depends on typer/rich versions and the terminal width, so it is not snapshotted;
instead every command and every parameter must declare help text, and every ``--help`` must render.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import typing
from pathlib import Path

import click
import pytest
import typer
from typer.models import ParameterInfo

from omopfl.cli import app, main

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "omopfl"

# Command path -> its parameters in declaration order: options by their flags (a boolean pair as
# "--on/--off"), arguments by their metavar.  "" is the root.  Changing a command's options changes this.
COMMANDS: dict[str, list[str]] = {
    "": [],
    "version": [],
    "synth": [
        "--out", "--sites", "--persons", "--seed", "--postgres-url-env", "--image-share", "--omics-share",
        "--adapters", "--label-skew", "--json",
    ],
    "eunomia": ["--out", "--postgres-url-env", "--cdm-schema", "--results-schema"],
    "prepare": ["--site", "--study", "--out", "--allow-fatal/--no-allow-fatal", "--json"],
    "validate": ["--site", "--study", "--json"],
    "stats": [
        "--study", "--site", "--prepared", "--out", "--audit", "--mode", "--superlink",
        "--send-scaler/--no-send-scaler", "--json",
    ],
    "covariates": ["--study", "--site", "--prepared", "--out", "--min-sites", "--min-persons", "--mode", "--json"],
    "train": [
        "--study", "--site", "--simulate", "--pooled", "--superlink", "--prepared", "--out", "--mode", "--rounds",
        "--strategy", "--resume", "--min-sites", "--round-timeout", "--root-certificates", "--insecure",
        "--auth-private-key", "--auth-public-key", "--runtime-port", "--stock-polling", "--worker/--no-worker",
        "--max-wait-time", "--json",
    ],
    "server": [
        "--study", "--host", "--port", "--out", "--rounds", "--strategy", "--min-sites", "--sites",
        "--wait-seconds", "--timeout", "--round-timeout", "--resume", "--audit/--no-audit", "--ssl-ca-certfile",
        "--ssl-certfile", "--ssl-keyfile", "--insecure", "--site-key", "--view", "--view-port", "--json",
    ],
    "view": ["RUN_DIR", "--port"],
    "demo": ["--out", "--sites", "--seed", "--adapters", "--study"],
    "examples": ["--out"],
    "evaluate": [
        "--run", "--site", "--prepared", "--rows", "--out", "--federated", "--simulate", "--superlink", "--timeout",
        "--json",
    ],
    "sites": [],
    "sites check": ["ADAPTERS", "--json"],
    "sites approve": ["ADAPTER", "STUDY", "--yes", "--json"],
    "sites studies": ["ADAPTER", "--json"],
    "sites revoke": ["ADAPTER", "STUDY_HASH"],
    "sites audit": ["ADAPTER", "--run", "--json"],
    "sites identity": ["ADAPTER"],
    "cohort": [],
    "cohort build": ["FILES", "--site", "--id", "--replace/--no-replace", "--translator", "--json"],
    "cohort list": ["--site", "--json"],
    "cohort show": ["COHORT_ID", "--site", "--json"],
}


def _walk(command: click.Command, prefix: tuple[str, ...] = ()) -> typing.Iterator[tuple[str, click.Command]]:
    yield " ".join(prefix), command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():  # registration order, as --help lists them
            yield from _walk(sub, (*prefix, name))


def _tree() -> list[tuple[str, click.Command]]:
    return list(_walk(typer.main.get_command(app)))


def _parameters(command: click.Command) -> list[str]:
    return [p.name.upper() if isinstance(p, click.Argument) else "/".join([*p.opts, *p.secondary_opts])
            for p in command.params]


def test_the_command_tree_is_the_documented_one() -> None:
    tree = _tree()
    assert [path for path, _ in tree] == list(COMMANDS)
    for path, command in tree:
        assert _parameters(command) == COMMANDS[path], f"omopfl {path}"


@pytest.mark.parametrize("path", [path for path in COMMANDS if path])
def test_every_command_and_parameter_declares_help(path: str) -> None:
    command = dict(_tree())[path]
    assert (command.help or "").strip(), f"omopfl {path} has no help text"
    if isinstance(command, click.Group):
        return
    # From the declaration, not the click object: typer 0.20.1 with click 8.5 drops an Argument's help.
    hints = typing.get_type_hints(command.callback, include_extras=True)
    for name, hint in hints.items():
        if name == "return":
            continue
        infos = [m for m in getattr(hint, "__metadata__", ()) if isinstance(m, ParameterInfo)]
        assert infos and (infos[0].help or "").strip(), f"omopfl {path}: parameter {name} has no help text"


@pytest.mark.parametrize("path", list(COMMANDS))
def test_every_help_renders(path: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    args = [*path.split(), "--help"]
    try:
        main(args)  # returns on success, raises SystemExit otherwise
    except SystemExit as exc:
        pytest.fail(f"omopfl {path} --help exited {exc.code}")
    out = capsys.readouterr().out
    assert "Usage:" in out
    command = dict(_tree())[path]
    first_words = " ".join((command.help or "").split()[:5])
    assert first_words in " ".join(out.split()), f"omopfl {path} --help"
    for parameter in COMMANDS[path]:
        assert parameter.split("/")[0].lower() in out.lower(), f"omopfl {path} --help lacks {parameter}"


def test_command_modules_do_not_import_the_root() -> None:
    """``omopfl.cli`` imports the audience modules; none of them imports it back."""
    for path in sorted(PACKAGE_DIR.glob("cli_*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert "omopfl.cli" not in names, f"{path.name} imports omopfl.cli"


def test_help_imports_no_heavy_module() -> None:
    """``omopfl --help`` stays fast: torch, Flower, SQLAlchemy, DuckDB, pandas, numpy load in commands only."""
    code = ("import sys\nfrom omopfl.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = ('torch', 'flwr', 'sqlalchemy', 'duckdb', 'pandas', 'numpy', 'great_expectations', 'monai')\n"
            "sys.stderr.write(' '.join(m for m in heavy if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stderr.strip() == ""
