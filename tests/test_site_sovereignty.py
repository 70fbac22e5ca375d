"""A site runs only omopfl's own code, only for studies it approved, and keeps the record of what left.

The hostile-coordinator tests start a real SuperLink and three sites through ``omopfl train --site``
(one per mode: tuned with the worker, tuned without it, Flower's stock polling without it), then play
a coordinator that is not omopfl's: its own ``flwr run`` with its own app bundle.  Every module the
attacker ships writes a marker file named after the process role when imported; the sites' processes
run with ``OMOPFL_TEST_ROLE=site``, so a ``site-*`` marker would prove attacker code ran at a site.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import pytest
from conftest import run_omopfl

from omopfl import audit, policy
from omopfl.config import load_site
from omopfl.errors import ConfigError
from omopfl.federation import codec
from omopfl.federation import processes as deploy
from omopfl.federation.run_config import toml_table
from omopfl.federation.site.audit_trail import audit_path
from omopfl.federation.site.bundle import COMPONENT, check_bundle
from omopfl.study import load_study

SITES = ("site_a", "site_b", "site_c")


# --------------------------------------------------------------------------------------------
# the code gate on bundles (fast, no Flower processes)
# --------------------------------------------------------------------------------------------


def _bundle(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return buffer.getvalue()


def _pyproject(clientapp: str = COMPONENT) -> str:
    return ('[project]\nname = "x"\nversion = "1.0.0"\n[tool.flwr.app]\npublisher = "p"\n'
            f'[tool.flwr.app.components]\nserverapp = "s:app"\nclientapp = "{clientapp}"\n')


def test_check_bundle_accepts_only_a_pyproject_naming_omopfls_component() -> None:
    assert check_bundle(_bundle({"pyproject.toml": _pyproject(), ".info/CONTENT": "pyproject.toml,ab,12"})) == ""
    assert check_bundle(_bundle({"pyproject.toml": _pyproject()})) == ""
    refused = {
        "own component": ({"pyproject.toml": _pyproject("evil:app")}, "foreign_app"),
        "no components": ({"pyproject.toml": '[project]\nname = "x"\n'}, "foreign_app"),
        "a module": ({"pyproject.toml": _pyproject(), "evil.py": "import os"}, "code_in_bundle"),
        "a package named like omopfl": ({"pyproject.toml": _pyproject(), "omopfl/__init__.py": ""}, "code_in_bundle"),
        "a .pth file": ({"pyproject.toml": _pyproject(), "x.pth": "import os"}, "code_in_bundle"),
        "an extension": ({"pyproject.toml": _pyproject(), "numpy/core.so": "\x7fELF"}, "code_in_bundle"),
        "a data file": ({"pyproject.toml": _pyproject(), "data.json": "{}"}, "code_in_bundle"),
        "a hidden listing": ({"pyproject.toml": _pyproject(), ".info/CONTENT": "pyproject.toml,a,1\nevil.py,b,2"},
                             "code_in_bundle"),
        "no pyproject": ({".info/CONTENT": ""}, "code_in_bundle"),
        "bad TOML": ({"pyproject.toml": "[tool"}, "foreign_app"),
    }
    for what, (files, code) in refused.items():
        assert check_bundle(_bundle(files)) == code, what
    assert check_bundle(b"not a zip") == "foreign_app"
    assert check_bundle(b"") == "foreign_app"


# --------------------------------------------------------------------------------------------
# policy and approvals
# --------------------------------------------------------------------------------------------


def _adapter(folder: Path, policy_text: str = "") -> Path:
    path = folder / "site_x.toml"
    path.write_text('[site]\nname = "site_x"\nmin_cell_count = 10\n\n[database]\nduckdb_path = "omop.duckdb"\n'
                    f'cdm_schema = "cdm"\nresults_schema = "results"\n{policy_text}')
    return path


def test_policy_is_parsed_and_checked(tmp_path: Path) -> None:
    site = load_site(_adapter(tmp_path, '\n[policy]\nallowed_models = ["mlp"]\nmax_rounds = 3\n'
                                        'release_metrics = false\nstate_dir = "state"\n'))
    assert site.policy.allowed_models == ("mlp",) and site.policy.max_rounds == 3
    assert not site.policy.release_metrics and site.policy.state_dir == (tmp_path / "state").resolve()
    assert policy.state_dir(load_site(_adapter(tmp_path))) == (tmp_path / "omopfl-site-site_x").resolve()
    for bad, key in (('allowed_models = ["svm"]', "allowed_models"), ("max_rounds = 0", "max_rounds"),
                     ("max_rounds = true", "max_rounds"), ('release_metrics = "yes"', "release_metrics"),
                     ("max_epsilon = -1.0", "max_epsilon"), ("max_epsilon = nan", "max_epsilon"),
                     ("surprise = 1", "surprise")):
        with pytest.raises(ConfigError, match=rf"\[policy\] {key}"):
            load_site(_adapter(tmp_path, f"\n[policy]\n{bad}\n"))


def test_policy_refuses_studies_it_cannot_serve(prepared_sites_factory) -> None:
    federation = prepared_sites_factory("policy", approve=False)
    adapter = federation["adapters"][0]
    spec = load_study(federation["study"])
    text = adapter.read_text()
    adapter.write_text(text + '\n[policy]\nallowed_models = ["mlp"]\nmax_rounds = 2\n')
    with pytest.raises(ConfigError, match=r"model kind 'logistic' is not in \[policy\] allowed_models.*"
                                          r"5 rounds, more than \[policy\] max_rounds 2"):
        policy.approve(load_site(adapter), spec)
    assert policy.approved_studies(load_site(adapter)) == []
    assert run_omopfl(["sites", "approve", str(adapter), str(federation["study"]), "--yes"]) == 2


def test_approve_list_revoke_through_the_cli_and_a_revoked_study_is_refused(prepared_sites_factory, capsys) -> None:
    from omopfl.federation.local import run_stats

    federation = prepared_sites_factory("approvals", approve=False)
    adapters, study = federation["adapters"], federation["study"]
    study_hash = federation["study_hash"]
    # without --yes and without a terminal nothing is approved
    assert run_omopfl(["sites", "approve", str(adapters[0]), str(study)]) == 2
    assert "add --yes" in capsys.readouterr().err
    for adapter in adapters:
        assert run_omopfl(["sites", "approve", str(adapter), str(study), "--yes"]) == 0
    shown = capsys.readouterr().out
    assert "what will leave the site" in shown and study_hash in shown and "auc" in shown
    assert run_omopfl(["sites", "studies", str(adapters[0]), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["studies"]
    assert [(s["hash"], s["revoked_at"]) for s in listed] == [(study_hash, None)]
    assert listed[0]["settings"] == codec.training_settings(load_study(study))
    # the exact bytes that were approved are kept
    state = policy.state_dir(load_site(adapters[0]))
    assert (state / "studies" / f"{study_hash}.toml").read_bytes() == study.read_bytes()

    result = run_stats(study, adapters, federation["prepared_dir"], mode="inprocess",
                       out=federation["tmp"] / "stats1.json")
    assert result["sites"]["contributing"] == list(SITES)

    assert run_omopfl(["sites", "revoke", str(adapters[0]), study_hash[:12]]) == 0
    assert run_omopfl(["sites", "revoke", str(adapters[0]), "zz"]) == 2
    result = run_stats(study, adapters, federation["prepared_dir"], mode="inprocess",
                       out=federation["tmp"] / "stats2.json")
    assert result["sites"]["contributing"] == ["site_b", "site_c"]
    assert [(f["site"], f["code"]) for f in result["sites"]["failed"]] == [("site_a", "study_not_approved")]
    entries = audit.read(audit_path(load_site(adapters[0])))
    assert [(e["message_type"], e["outcome"], e["code"]) for e in entries][-1] == \
        ("query.stats", "refused", "study_not_approved")
    capsys.readouterr()
    assert run_omopfl(["sites", "audit", str(adapters[0]), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["chain_intact"] and shown["lines"] == len(entries) >= 3
    assert run_omopfl(["sites", "audit", str(adapters[0])]) == 0
    assert "hash chain intact" in capsys.readouterr().out


def test_audit_log_is_hash_chained(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    for i in range(3):
        audit.append(path, {"run_id": i, "message_type": "train", "sha256": str(i)})
    assert audit.verify(path) == (True, 3)
    assert [e["seq"] for e in audit.read(path)] == [1, 2, 3]
    assert [e["run_id"] for e in audit.read(path, run_id=1)] == [1]
    lines = path.read_bytes().splitlines()
    path.write_bytes(b"\n".join([lines[0], lines[1].replace(b'"train"', b'"evaluate"'), lines[2]]) + b"\n")
    assert audit.verify(path)[0] is False
    path.write_bytes(b"\n".join([lines[0], lines[2]]) + b"\n")  # a line removed
    assert audit.verify(path)[0] is False


def test_release_metrics_false_sends_no_metrics(prepared_sites_factory) -> None:
    from omopfl.errors import FederationError
    from omopfl.federation.local import run_training

    federation = prepared_sites_factory("nometrics", approve=False)
    spec = load_study(federation["study"])
    for adapter in federation["adapters"]:
        adapter.write_text(adapter.read_text() + "\n[policy]\nrelease_metrics = false\n")
        policy.approve(load_site(adapter), spec)
    with pytest.raises(FederationError, match="min-sites"):  # the final evaluation is refused everywhere
        run_training(federation["study"], federation["adapters"], federation["prepared_dir"],
                     out_dir=federation["tmp"] / "run", rounds=2, evaluate_on_train=True)
    for adapter in federation["adapters"]:
        entries = audit.read(audit_path(load_site(adapter)))
        trains = [e for e in entries if e["message_type"] == "train"]
        assert len(trains) == 2 and all(e["outcome"] == "sent" for e in trains)
        assert all({r["name"] for r in e["records"]} == {"arrays", "metrics"} for e in trains)  # no "evaluate"
        last = entries[-1]
        assert (last["message_type"], last["code"]) == ("evaluate", "policy")


# --------------------------------------------------------------------------------------------
# a hostile coordinator on a real deployment
# --------------------------------------------------------------------------------------------

_MARKER = '''import os as _os
import pathlib as _pathlib
_pathlib.Path({folder!r}, _os.environ.get("OMOPFL_TEST_ROLE", "coordinator") + "-" + {name!r}).write_text("ran")
'''

_EVIL_CLIENT = '''
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def _leak(message, context):
    text = open(str(context.node_config.get("site-config", ""))).read()
    return Message(RecordDict({"leak": ConfigRecord({"adapter": text})}), reply_to=message)


app.query("rows")(_leak)
app.train()(_leak)
'''

_EVIL_SERVER = '''
import json
import time

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import ServerApp

app = ServerApp()


@app.main()
def main(grid, context):
    cfg = context.run_config
    deadline = time.time() + 60
    nodes = []
    while time.time() < deadline and len(nodes) < int(cfg["nodes"]):
        nodes = list(grid.get_node_ids())
        time.sleep(0.2)
    messages = [Message(RecordDict({"config": ConfigRecord({"please": "rows"})}), dst_node_id=n,
                        message_type=str(cfg["message-type"])) for n in nodes]
    replies = grid.send_and_receive(messages, timeout=120)
    out = []
    for reply in replies:
        if reply.has_error():
            out.append({"error": int(reply.error.code), "reason": str(reply.error.reason)})
        else:
            out.append({"content": {name: {k: str(v) for k, v in record.items()}
                                    for name, record in reply.content.items()}})
    with open(str(cfg["out-path"]), "w") as fh:
        json.dump(out, fh)
'''


def _attacker_app(folder: Path, markers: Path, clientapp: str, packages: dict[str, str]) -> Path:
    app = folder / "app"
    app.mkdir(parents=True)
    (app / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n\n'
        '[project]\nname = "innocent-study"\nversion = "1.0.0"\nlicense = "Apache-2.0"\ndependencies = []\n\n'
        '[tool.flwr.app]\npublisher = "mallory"\n\n[tool.flwr.app.components]\n'
        f'serverapp = "evil_server:app"\nclientapp = "{clientapp}"\n\n'
        '[tool.flwr.app.config]\nnodes = 3\nmessage-type = "query.rows"\nout-path = ""\n')
    (app / "evil_server.py").write_text(_EVIL_SERVER)
    for relative, body in packages.items():
        path = app / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_MARKER.format(folder=str(markers), name=relative.replace("/", ".")) + body)
    return app


def _flwr_run(app: Path, connection: str, env: dict[str, str], run_config: dict[str, Any], work: Path) -> int:
    import subprocess

    config = work / "run_config.toml"
    config.write_text(toml_table(run_config))
    done = subprocess.run([deploy.executable("flwr"), "run", str(app), connection, "--run-config", str(config),
                           "--stream"], env=env, capture_output=True, timeout=300, stdin=subprocess.DEVNULL)
    (work / "flwr_run.log").write_bytes(done.stdout + done.stderr)
    return done.returncode


@pytest.fixture(scope="module")
def hostile(prepared_sites_factory, tmp_path_factory):
    """A SuperLink and three sites (``omopfl train --site``, one per mode) that approved the study."""
    federation = prepared_sites_factory("sovereignty")
    work = tmp_path_factory.mktemp("hostile")
    home = work / "flwr_home"
    env = {**deploy.flower_env(), "FLWR_HOME": str(home)}
    coordinator = deploy.Processes(env, work)
    sites = deploy.Processes({**env, "OMOPFL_TEST_ROLE": "site", "FLWR_HOME": str(work / "site_home")}, work)
    try:
        port = deploy.start_superlink(coordinator)
        modes = {"site_a": {"tuned": True, "worker": True}, "site_b": {"tuned": True, "worker": False},
                 "site_c": {"tuned": False, "worker": False}}
        for adapter in federation["adapters"]:
            name = adapter.stem
            deploy.start_site_node(sites, adapter, f"127.0.0.1:{port}", federation["prepared_dir"], name=name,
                                   **modes[name])
        connection = deploy.write_connection(home, f"127.0.0.1:{port}")
        yield {**federation, "work": work, "env": env, "connection": connection, "markers": work / "markers",
               "site_procs": sites}
    finally:
        sites.stop()
        coordinator.stop()


def _site_markers(markers: Path) -> list[str]:
    return sorted(p.name for p in markers.glob("site-*")) if markers.is_dir() else []


def _last_entries(federation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {a.stem: audit.read(audit_path(load_site(a)))[-1] for a in federation["adapters"]}


def _replies(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text())


def _assert_refused(replies: list[dict[str, Any]], code: str) -> None:
    assert len(replies) == 3, replies
    for reply in replies:
        assert set(reply) == {"content"}, reply  # a reply, not a Flower error carrying text
        assert set(reply["content"]) == {"omopfl.site"}
        assert reply["content"]["omopfl.site"]["status"] == "error"
        assert reply["content"]["omopfl.site"]["code"] == code
        assert "adapter" not in json.dumps(reply)


@pytest.mark.slow
def test_hostile_coordinator_apps_are_refused_before_any_of_their_code_runs(hostile) -> None:
    """Its own ClientApp; then omopfl's component name with packages shadowing omopfl and numpy.  (Both
    bundles hold the attacker's ServerApp module too, so both are ``code_in_bundle``; a bundle naming
    another component without shipping code is ``foreign_app``, tested on bundles above.)"""
    markers = hostile["markers"]
    markers.mkdir()
    cases = [
        ("own_clientapp", "evil_client:app", {"evil_client.py": _EVIL_CLIENT}, "query.rows", "code_in_bundle"),
        ("shadowing", COMPONENT, {"omopfl/__init__.py": "", "omopfl/federation/__init__.py": "",
                                  "omopfl/federation/site/__init__.py": "",
                                  "omopfl/federation/site/app.py": _EVIL_CLIENT, "numpy/__init__.py": "",
                                  "sitecustomize.py": "", "evil_client.py": _EVIL_CLIENT}, "train", "code_in_bundle"),
    ]
    for name, clientapp, packages, message_type, code in cases:
        folder = hostile["work"] / name
        app = _attacker_app(folder, markers, clientapp, packages)
        out = folder / "replies.json"
        assert _flwr_run(app, hostile["connection"], hostile["env"],
                         {"message-type": message_type, "out-path": str(out)}, folder) == 0, name
        _assert_refused(_replies(out), code)
        assert _site_markers(markers) == [], name
        for site, entry in _last_entries(hostile).items():
            assert (entry["outcome"], entry["code"], entry["message_type"]) == ("refused", code, message_type), site
    # nothing of the bundles was extracted at the sites
    assert not any((hostile["work"] / "site_home").rglob("evil_client.py"))


@pytest.mark.slow
def test_hostile_coordinator_with_omopfls_app_gets_only_refusals_then_a_legit_run_is_served(hostile) -> None:
    from omopfl.federation.run_config import app_pyproject, training_run_config

    spec = load_study(hostile["study"])
    work = hostile["work"]

    def omopfl_run(name: str, study, **overrides: Any) -> tuple[int, Path]:
        folder = work / name
        (folder / "app").mkdir(parents=True)
        (folder / "app" / "pyproject.toml").write_text(app_pyproject("train"))
        run_dir = folder / "run"
        config = {**training_run_config(study, run_dir, min_sites=1, expected_sites=3, audit=True, rounds=2,
                                        wait_seconds=60, timeout=120, round_timeout=120), **overrides}
        return _flwr_run(folder / "app", hostile["connection"], hostile["env"], config, folder), folder

    # an altered study (one byte more): not approved anywhere
    altered = hostile["study"].with_name("altered.toml")
    altered.write_text(hostile["study"].read_text() + " ")
    _code, folder = omopfl_run("altered", load_study(altered))
    assert "site_a: study not approved" in (folder / "flwr_run.log").read_text()
    assert {e["code"] for e in _last_entries(hostile).values()} == {"study_not_approved"}

    # the approved study's hash with other settings: statistics are served, training is refused
    _code, folder = omopfl_run("settings", spec, **{"local-epochs": 50, "test-fraction": 0.9, "seed": 7})
    log = (folder / "flwr_run.log").read_text()
    assert "settings differ from the approved study" in log
    for site, entry in _last_entries(hostile).items():
        assert (entry["message_type"], entry["code"]) == ("train", "settings_mismatch"), site
    assert _site_markers(hostile["markers"]) == []

    # the next legitimate run is served, and every reply the server got is in the sites' logs by hash
    code, folder = omopfl_run("legit", spec)
    assert code == 0, (folder / "flwr_run.log").read_text()[-3000:]
    manifest = json.loads((folder / "run" / "manifest.json").read_text())
    assert manifest["sites"] == list(SITES) and manifest["final"]["round"] == 2
    received = json.loads((folder / "run" / "audit.json").read_text())["replies"]
    run_ids = {}
    logged = []
    for adapter in hostile["adapters"]:
        entries = audit.read(audit_path(load_site(adapter)))
        run_ids[adapter.stem] = entries[-1]["run_id"]
        logged += [e for e in entries if e["run_id"] == entries[-1]["run_id"]]
        assert audit.verify(audit_path(load_site(adapter)))[0]
    assert len(set(run_ids.values())) == 1
    assert sorted(r["sha256"] for r in received) == sorted(e["sha256"] for e in logged)
    types = {e["message_type"] for e in logged}
    assert types == {"query.stats", "query.scaler", "train", "evaluate"}
    assert all(e["outcome"] == "sent" for e in logged)
    train = next(e for e in logged if e["message_type"] == "train")
    assert {r["name"] for r in train["records"]} >= {"arrays", "metrics"} and train["bytes"] > 0
    stats = next(e for e in logged if e["message_type"] == "query.stats")
    moments = next(r for r in stats["records"] if r["name"] == "omopfl.moments")
    assert set(moments["values"]) == {"persons", "released", "n", "mean", "m2"}  # the released numbers


def test_site_node_refuses_to_start_on_an_unchecked_flower(monkeypatch) -> None:
    from omopfl.federation import flower_internals

    monkeypatch.setattr("flwr.__version__", "9.9.9")
    from omopfl.errors import FlowerVersionError
    from omopfl.federation.site.superexec import require_checked_flower

    with pytest.raises(FlowerVersionError, match=r"Flower 9\.9\.9"):
        require_checked_flower()
    with pytest.raises(flower_internals.UncheckedFlowerError, match=r"Flower 9\.9\.9"):
        flower_internals.site_executor(fork=True, run_task=lambda _args: None, module="omopfl.federation.site.runtime")
    assert os.environ.get("OMOPFL_TEST_ROLE") is None
