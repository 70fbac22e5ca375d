"""The compose files and the Dockerfile, checked without a Docker engine.

docker-compose.yml (one machine) and deploy/compose.coordinator.yml + deploy/compose.site.yml (one host
per party, TLS and SuperNode authentication): valid against the compose-spec schema
(``check-jsonschema --builtin-schema vendor.compose-spec``), every omopfl command and option they run
exists, waited-on services have healthchecks, SuperNodes restart, an insecure port is published on
loopback only.  The Dockerfile passes hadolint and prepares /data for its numeric runtime user.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import click
import typer
import yaml

from omopfl.cli import app

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILES = [ROOT / "docker-compose.yml", ROOT / "deploy" / "compose.coordinator.yml",
                 ROOT / "deploy" / "compose.site.yml"]
BIN = Path(sys.executable).parent


def load_compose(path: Path = COMPOSE_FILES[0]) -> dict:
    return yaml.safe_load(path.read_text())


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
    assert "-h 127.0.0.1" in " ".join(health)  # TCP: not the image's socket-only initialisation server
    # the SuperLink is started by `omopfl server`; every SuperNode connects to it once it accepts connections
    assert services["server"]["command"][:2] == ["omopfl", "server"]
    assert services["server"]["ports"] == ["127.0.0.1:9092:9092"]  # --insecure: this machine only
    assert "9092" in " ".join(services["server"]["healthcheck"]["test"])
    for name in ("supernode-site-a", "supernode-site-b", "supernode-site-c"):
        command = services[name]["command"]
        assert command[command.index("--superlink") + 1] == "server:9092"
        assert services[name]["depends_on"]["server"]["condition"] == "service_healthy"
        assert services[name]["restart"].startswith("on-failure")
        # the site serves only a study its data engineer approved first
        approve = services[name.replace("supernode-", "approve-")]
        assert approve["command"][:3] == ["omopfl", "sites", "approve"]
        assert approve["command"][3] == command[command.index("--site") + 1]
        assert services[name]["depends_on"][name.replace("supernode-", "approve-")]["condition"] == \
            "service_completed_successfully"
    # no secret written in the file: the password comes from the environment
    text = (ROOT / "docker-compose.yml").read_text()
    assert "${OMOPFL_PG_PASSWORD:?" in text
    assert "POSTGRES_PASSWORD: ${" in text


def test_every_omopfl_command_and_option_exists() -> None:
    checked = {}
    for path in COMPOSE_FILES:
        checked[path.name] = 0
        for name, service in load_compose(path)["services"].items():
            command = service.get("command")
            if not command or command[0] != "omopfl":
                continue
            leaf, rest = resolve_omopfl_command(command[1:])
            known = {opt for param in leaf.params for opt in getattr(param, "opts", [])}
            for token in rest:
                if token.startswith("--"):
                    assert token in known, f"{path.name} service {name}: omopfl {leaf.name} has no option {token}"
            checked[path.name] += 1
    # synth, three approve, three prepare, the server, three SuperNodes; the coordinator's server;
    # a site's approve, prepare and SuperNode
    assert checked == {"docker-compose.yml": 11, "compose.coordinator.yml": 1, "compose.site.yml": 3}


def test_every_service_runs_an_omopfl_command_or_postgres() -> None:
    """Flower's processes are started by omopfl (server: SuperLink; train --site: SuperNode), never by hand."""
    for path in COMPOSE_FILES:
        for name, service in load_compose(path)["services"].items():
            command = service.get("command")
            assert (command and command[0] == "omopfl") or service.get("image", "").startswith("postgres"), name


def test_compose_files_are_valid_against_the_compose_spec(tmp_path: Path) -> None:
    done = subprocess.run([str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                           *map(str, COMPOSE_FILES)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    # the check can fail: a misspelt key is refused
    bad = tmp_path / "bad.yml"
    bad.write_text((ROOT / "docker-compose.yml").read_text().replace("healthcheck:", "healthchek:", 1))
    done = subprocess.run([str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "healthchek" in done.stdout + done.stderr


def test_waits_have_healthchecks_and_restarts_and_insecure_ports_stay_local() -> None:
    for path in COMPOSE_FILES:
        services = load_compose(path)["services"]
        for name, service in services.items():
            for target, dependency in (service.get("depends_on") or {}).items():
                if dependency.get("condition") == "service_healthy":
                    assert "healthcheck" in services[target], f"{path.name}: {name} waits for {target}'s health"
            command = service.get("command") or []
            if "--superlink" in command:  # a SuperNode: it exits when its SuperLink is not ready
                assert str(service.get("restart", "no")).startswith("on-failure"), f"{path.name}: {name}"
            if "--insecure" in command:
                for port in service.get("ports", []):
                    assert str(port).startswith("127.0.0.1:"), f"{path.name}: {name} publishes {port}"


def test_the_multi_host_example_uses_tls_and_supernode_authentication() -> None:
    coordinator = load_compose(COMPOSE_FILES[1])
    server = coordinator["services"]["server"]["command"]
    assert "--insecure" not in server
    for option in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"):
        assert server[server.index(option) + 1].startswith("/run/secrets/")
    assert server.count("--site-key") == 3
    assert set(coordinator["secrets"]) == {"ca.pem", "server.pem", "server.key"}
    site = load_compose(COMPOSE_FILES[2])
    node = site["services"]["supernode"]["command"]
    assert "--insecure" not in node
    assert node[node.index("--root-certificates") + 1] == "/run/secrets/ca.pem"
    assert node[node.index("--auth-private-key") + 1] == "/run/secrets/site_key"
    for step in ("approve", "prepare"):
        assert site["services"]["supernode"]["depends_on"][step]["condition"] == "service_completed_successfully"
    assert site["services"]["approve"]["command"][:4] == ["omopfl", "sites", "approve", "/site/adapter.toml"]
    # secrets come from files and the environment, never written in the compose files
    for path in COMPOSE_FILES:
        text = path.read_text()
        assert not re.search(r"postgres(ql)?(\+\w+)?://[^$\s]*:[^$@\s]+@", text.replace("...", "")), path.name
        for key, value in (yaml.safe_load(text).get("x-site", {}).get("environment") or {}).items():
            assert str(value).startswith("${"), key


def test_dockerfile_lints_clean_and_prepares_data_for_its_user() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "pip install" in text and "COPY omopfl" in text
    uid = re.search(r"useradd [^\n]*--uid (\d+)", text).group(1)
    assert re.search(rf"^USER {uid}(:{uid})?$", text, re.M)  # numeric and not root
    assert "mkdir -p /data" in text and f"chown {uid}:{uid} /data" in text
    done = subprocess.run([str(BIN / "hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
