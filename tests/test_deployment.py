"""Flower's Deployment Engine on loopback, started only through omopfl's commands.

``omopfl server`` (SuperLink + the training app) and one ``omopfl train --site ... --superlink ...``
per site (SuperNode + the site's long-lived worker) run as separate processes, as at real sites.

* two sites: the run completes and writes the whole run directory (model, metrics, plot, report);
* three sites, one SuperNode killed (SIGKILL of its process group) after the first checkpoint:
  the server drops that site after the round timeout and finishes with the two others.

Every process is started in its own session and stopped by its PID (process group).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from omopfl.federation.processes import flower_env, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def federation(prepared_sites_factory) -> dict[str, Any]:
    return prepared_sites_factory("deployment")


def _omopfl() -> list[str]:
    script = Path(sys.executable).parent / "omopfl"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "omopfl.cli"]


class _Started:
    """Processes started in their own sessions, stopped by PID (process group) at the end."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        with (self.logs / f"{name}.log").open("wb") as log:
            env = {**flower_env(), "FLWR_HOME": str(self.logs / f"flwr_home_{name}")}  # not the user's ~/.flwr
            proc = subprocess.Popen([*_omopfl(), *args], stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.procs[name] = proc
        return proc

    def kill(self, name: str) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait(timeout=30)

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=15)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group (superexec, clientapp)
            proc.wait(timeout=15)


def _server_args(federation: dict[str, Any], port: int, run_dir: Path, *extra: str) -> list[str]:
    return ["server", "--study", str(federation["study"]), "--insecure", "--host", "127.0.0.1", "--port", str(port),
            "--out", str(run_dir), "--wait-seconds", "120", "--timeout", "120", "--json", *extra]


def _site_args(federation: dict[str, Any], index: int, port: int) -> list[str]:
    return ["train", "--site", str(federation["adapters"][index]), "--superlink", f"127.0.0.1:{port}", "--insecure",
            "--prepared", str(federation["prepared_dir"])]


def _wait(proc: subprocess.Popen, seconds: float, started: _Started, name: str) -> int:
    try:
        return proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name} did not finish within {seconds:.0f} s:\n{started.log(name)[-4000:]}")


def test_server_and_two_supernodes_through_omopfl_commands(federation, tmp_path: Path) -> None:
    port = free_port()
    run_dir = tmp_path / "run"
    started = _Started(tmp_path)
    try:
        server = started.start("server", _server_args(federation, port, run_dir, "--rounds", "2", "--sites", "2",
                                                      "--min-sites", "2", "--audit"))
        for index in (0, 1):
            started.start(f"site_{index}", _site_args(federation, index, port))
        code = _wait(server, 400, started, "server")
    finally:
        started.stop_all()
    assert code == 0, started.log("server")[-4000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    print(json.dumps({"seconds": manifest["seconds"], "final": manifest["final"]}))
    assert manifest["sites"] == ["site_a", "site_b"] and manifest["dropped"] == []
    assert manifest["final"]["round"] == 2 and manifest["final"]["eval_auc"] > 0.6
    for name in ("model.npz", "scaler.json", "features.json", "metrics.json", "metrics.csv", "metrics.png",
                 "report.md", "checkpoint.json", "audit.json"):
        assert (run_dir / name).is_file(), name
    assert set(manifest["cohort_hashes"]) == {"target", "outcome"}
    # the SuperNodes ran the site work in their long-lived workers and Flower's replies were clean
    replies = json.loads((run_dir / "audit.json").read_text())["replies"]
    assert replies and all("content" in r for r in replies)
    assert "omopfl round 2/2" in started.log("server")


def test_a_killed_supernode_is_dropped_and_the_run_finishes(federation, tmp_path: Path) -> None:
    port = free_port()
    run_dir = tmp_path / "run"
    started = _Started(tmp_path)
    try:
        server = started.start("server", _server_args(federation, port, run_dir, "--rounds", "4", "--sites", "3",
                                                      "--min-sites", "2", "--round-timeout", "20"))
        for index in (0, 1, 2):
            started.start(f"site_{index}", _site_args(federation, index, port))
        deadline = time.monotonic() + 300
        checkpoint = run_dir / "checkpoint.json"
        while not (checkpoint.is_file() and json.loads(checkpoint.read_text())["round"] >= 1):
            assert server.poll() is None, started.log("server")[-4000:]
            assert time.monotonic() < deadline, "no round completed within 300 s"
            time.sleep(0.2)
        started.kill("site_2")  # site_c's SuperNode, its worker and any ClientApp it was running
        code = _wait(server, 300, started, "server")
    finally:
        started.stop_all()
    assert code == 0, started.log("server")[-4000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [d["site"] for d in manifest["dropped"]] == ["site_c"], manifest["dropped"]
    assert manifest["sites"] == ["site_a", "site_b"]
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert rounds[0]["sites"] == 3 and rounds[-1]["sites"] == 2
    assert rounds[-1]["eval_auc"] is not None
    assert "site_c dropped in round" in started.log("server")


def _certificates(folder: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost (what a coordinator would issue)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("omopfl test CA")).issuer_name(name("omopfl test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    files = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return files


def _site_key(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode key pair as ``ssh-keygen -t ecdsa -b 384`` writes it (OpenSSH private and public key)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    private.chmod(0o600)
    return private, public


def test_tls_and_supernode_authentication(federation, tmp_path: Path) -> None:
    """Over TLS (the SuperLink serves the coordinator's certificate, SuperNodes verify it, no --insecure)
    with SuperNode authentication: the server registers site_a's and site_b's public keys; site_c's
    SuperNode holds a key nobody registered and never takes part."""
    tls = _certificates(tmp_path)
    keys = [_site_key(tmp_path, name) for name in ("site_a", "site_b", "site_c")]
    port = free_port()
    run_dir = tmp_path / "run"
    started = _Started(tmp_path)
    server_args = [a for a in _server_args(federation, port, run_dir, "--rounds", "1", "--sites", "2", "--min-sites",
                                           "2") if a != "--insecure"]
    server_args += ["--ssl-ca-certfile", str(tls["ca"]), "--ssl-certfile", str(tls["cert"]),
                    "--ssl-keyfile", str(tls["key"]), "--site-key", str(keys[0][1]), "--site-key", str(keys[1][1])]
    try:
        server = started.start("server", server_args)
        deadline = time.monotonic() + 120  # a SuperNode whose key is not registered yet is refused for good
        while "site key(s) registered" not in started.log("server"):
            assert server.poll() is None and time.monotonic() < deadline, started.log("server")[-3000:]
            time.sleep(0.2)
        # the unregistered site first: it must not be counted among the two awaited
        for index in (2, 0, 1):
            site_args = [a for a in _site_args(federation, index, port) if a != "--insecure"]
            started.start(f"site_{index}", [*site_args, "--root-certificates", str(tls["ca"]),
                                            "--auth-private-key", str(keys[index][0])])
        code = _wait(server, 400, started, "server")
    finally:
        started.stop_all()
    assert code == 0, started.log("server")[-4000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["sites"] == ["site_a", "site_b"] and manifest["final"]["round"] == 1
    assert manifest["stats_sites"]["connected"] == 2
    assert "site key(s) registered" in started.log("server")
    assert "SuperNode ID" not in started.log("site_2")  # refused by the SuperLink
    assert "SuperNode ID" in started.log("site_0")


def test_server_without_sites_stops_after_its_wait_with_one_clear_line(federation, tmp_path: Path) -> None:
    """No run waits forever: with no SuperNode the server gives up after --wait-seconds, exits non-zero
    with one line saying why, and writes no run directory."""
    started = _Started(tmp_path)
    run_dir = tmp_path / "run"
    args = _server_args(federation, free_port(), run_dir, "--sites", "2", "--min-sites", "2")
    args[args.index("--wait-seconds") + 1] = "3"
    try:
        code = _wait(started.start("server", args), 120, started, "server")
    finally:
        started.stop_all()
    log = started.log("server")
    assert code == 7, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith("omopfl: error:")]
    assert len(errors) == 1 and "0 site(s) connected within 3 s, fewer than min-sites 2" in errors[0], log[-3000:]
    assert not (run_dir / "manifest.json").exists()
