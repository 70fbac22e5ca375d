"""docker-compose.yml: parses, has a healthy PostgreSQL, and every command it runs exists."""

from __future__ import annotations

from pathlib import Path

import click
import typer
import yaml

from omopfl.cli import app

ROOT = Path(__file__).resolve().parents[1]


def load_compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def resolve_omopfl_command(args: list[str]) -> tuple[click.Command, list[str]]:
    """Walk the Typer app's command tree along ``args``; return the leaf command and its remaining args."""
    command: click.Command = typer.main.get_command(app)
    rest = list(args)
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        name = rest.pop(0)
        sub = command.commands.get(name)
        assert sub is not None, f"omopfl has no command {name!r}"
        command = sub
    return command, rest


def test_services_and_healthcheck() -> None:
    compose = load_compose()
    services = compose["services"]
    assert {"postgres", "synth", "server"} <= set(services)
    assert [s for s in services if s.startswith("supernode-")] == [
        "supernode-site-a", "supernode-site-b", "supernode-site-c",
    ]
    health = services["postgres"]["healthcheck"]["test"]
    assert "pg_isready" in " ".join(health)
    assert services["synth"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    # the SuperLink is started by `omopfl server`; every SuperNode connects to it
    assert services["server"]["command"][:2] == ["omopfl", "server"] and "9092:9092" in services["server"]["ports"]
    for name in ("supernode-site-a", "supernode-site-b", "supernode-site-c"):
        command = services[name]["command"]
        assert command[command.index("--superlink") + 1] == "server:9092"
        assert services[name]["depends_on"]["server"]["condition"] == "service_started"
    # no secret written in the file: the password comes from the environment
    text = (ROOT / "docker-compose.yml").read_text()
    assert "${OMOPFL_PG_PASSWORD:?" in text
    assert "POSTGRES_PASSWORD: ${" in text


def test_every_omopfl_command_and_option_exists() -> None:
    checked = 0
    for name, service in load_compose()["services"].items():
        command = service.get("command")
        if not command or command[0] != "omopfl":
            continue
        leaf, rest = resolve_omopfl_command(command[1:])
        known = {opt for param in leaf.params for opt in getattr(param, "opts", [])}
        for token in rest:
            if token.startswith("--"):
                assert token in known, f"service {name}: omopfl {leaf.name} has no option {token}"
        checked += 1
    assert checked == 8  # synth, three prepare, the server, three SuperNodes


def test_every_service_runs_an_omopfl_command_or_postgres() -> None:
    """Flower's processes are started by omopfl (server: SuperLink; train --site: SuperNode), never by hand."""
    for name, service in load_compose()["services"].items():
        command = service.get("command")
        assert (command and command[0] == "omopfl") or service.get("image", "").startswith("postgres"), name


def test_dockerfile_installs_the_package() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "pip install" in text and "COPY omopfl" in text
    assert "USER omopfl" in text  # not root
