"""Flower Deployment Engine processes: SuperLink, SuperNodes (through ``omopfl train --site``), ``flwr run``.

Everything here starts processes in their own sessions and stops them by PID (their process
group) in a ``finally``; nothing is ever stopped by name.  Used by ``omopfl server``
(:mod:`omopfl.federation.coordinator.command`), by the loopback runs of ``omopfl stats`` / ``omopfl train
--simulate --mode deployment`` and by the tests and benches.

Round-trip tuning (Flower 1.41 and 1.42)
    * ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` (Flower's own setting, default 1 s) is set to
      :data:`TASK_POLL_SECONDS` for the SuperNodes omopfl starts;
    * the SuperNode's idle sleep (hard-coded 3 s) and reply wait (0.5 s) are shortened by
      :mod:`omopfl.federation.site.node` (only on the Flower version it was checked against);
    * the ServerApp collects replies in a tight loop (:class:`omopfl.federation.coordinator.grid.FastGrid`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omopfl.errors import ConfigError, FederationError
from omopfl.federation.run_config import toml_table

__all__ = ["FLOWER_ENV", "TASK_POLL_SECONDS", "Processes", "flower_env", "free_port", "wait_for_port", "executable",
           "start_superlink", "start_site_node", "write_connection", "register_site_key",
           "flwr_run", "node_config_text"]

_log = logging.getLogger("omopfl.federation")

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
TASK_POLL_SECONDS = 0.05
"""SuperExec task poll interval for the SuperNodes omopfl starts (Flower's default: 1 s)."""


def flower_env(base: dict[str, str] | None = None, *, tuned: bool = True) -> dict[str, str]:
    """The environment for Flower's processes: no telemetry, this interpreter's bin first on PATH.

    Flower's processes start each other by name (``flower-superexec``, ``flwr-clientapp``,
    ``flwr-serverapp``), so the interpreter's own folder must come first even when the virtual
    environment is not activated.
    """
    env = {**(os.environ if base is None else base), **FLOWER_ENV}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if tuned:
        env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", str(TASK_POLL_SECONDS))
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen, seconds: float = 60.0, what: str = "flower-superlink") -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FederationError(f"{what} exited with code {proc.returncode} before listening on port {port}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise FederationError(f"{what} did not listen on port {port} within {seconds:.0f} s")


def executable(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise FederationError(f"{name} not found: install omopfl's dependencies (scripts/env.sh)")
    return found


class Processes:
    """Subprocesses started in their own sessions; stopped by PID (their process group)."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("wb")
        try:
            proc = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        self.procs.append((name, proc))
        return proc

    def get(self, name: str) -> subprocess.Popen:
        return next(proc for n, proc in self.procs if n == name)

    def kill(self, name: str) -> None:
        """SIGKILL one process's group (a site dying without a goodbye)."""
        self.signal(self.get(name), signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.get(name).wait(timeout=10)

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            self.signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for _, proc in reversed(self.procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            # children (flower-superexec, flwr-clientapp/serverapp) share the group: stop them too
            self.signal(proc, signal.SIGKILL)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                _log.warning("process %d did not stop", proc.pid)
        self.procs.clear()

    @staticmethod
    def signal(proc: subprocess.Popen, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)  # the group we created with start_new_session: its id is our child's PID


def _check_path(path: Path) -> str:
    text = str(path)
    if "'" in text or "\n" in text or '"' in text:
        raise ConfigError(f"{path}: a path with a quote or newline cannot be passed in a SuperNode's node config")
    return text


def node_config_text(adapter: Path, prepared_dir: Path, extra: dict[str, str] | None = None) -> str:
    """A SuperNode's ``--node-config``: the adapter and the prepared folder (paths, never a secret)."""
    values = {"site-config": Path(adapter).resolve(), "prepared-dir": Path(prepared_dir).resolve(), **(extra or {})}
    return " ".join(f"{key}='{_check_path(Path(value)) if isinstance(value, Path) else value}'"
                    for key, value in values.items())


def start_superlink(procs: Processes, *, host: str = "127.0.0.1", port: int | None = None,
                    tls: dict[str, Path] | None = None, name: str = "superlink",
                    extra: list[str] | None = None) -> int:
    """Start ``flower-superlink`` (insecure unless ``tls`` = ``{"ca", "cert", "key"}``); wait for its port."""
    port = port or free_port()
    args = [executable("flower-superlink"), "--host", host, "--port", str(port)]
    if tls:
        args += ["--ssl-ca-certfile", str(tls["ca"]), "--ssl-certfile", str(tls["cert"]),
                 "--ssl-keyfile", str(tls["key"])]
    else:
        args.append("--insecure")
    args += extra or []
    proc = procs.start(name, args)
    wait_for_port(port, proc)
    return port


def start_site_node(procs: Processes, adapter: Path, superlink: str, prepared_dir: Path, *, name: str,
                    tuned: bool = True, worker: bool | None = None) -> subprocess.Popen:
    """Start ``omopfl train --site ADAPTER --superlink ADDRESS`` (a SuperNode serving the site).

    ``tuned=False`` keeps Flower's stock polling and, unless ``worker`` says otherwise, runs every
    message in Flower's own ``flwr-clientapp`` process (no long-lived worker).
    """
    omopfl = Path(sys.executable).parent / "omopfl"
    base = [str(omopfl)] if omopfl.is_file() else [sys.executable, "-m", "omopfl.cli"]
    args = [*base, "train", "--site", str(Path(adapter).resolve()), "--superlink", superlink,
            "--prepared", str(Path(prepared_dir).resolve()), "--insecure"]
    if not tuned:
        args.append("--stock-polling")
    if not (tuned if worker is None else worker):
        args.append("--no-worker")
    return procs.start(name, args)


def write_connection(home: Path, address: str, *, root_certificates: Path | None = None) -> str:
    """Write a Flower configuration (``FLWR_HOME/config.toml``) with one SuperLink connection ``omopfl``."""
    home.mkdir(parents=True, exist_ok=True)
    security = (f"root-certificates = {json.dumps(str(root_certificates))}\n" if root_certificates
                else "insecure = true\n")
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "omopfl"\n\n[superlink.omopfl]\naddress = "{address}"\n{security}')
    return "omopfl"


def register_site_key(public_key: Path, connection: str, env: dict[str, str]) -> None:
    """``flwr supernode register <key> <connection>``: only SuperNodes holding a registered key may join."""
    completed = subprocess.run([executable("flwr"), "supernode", "register", str(public_key), connection],
                               env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    if completed.returncode != 0:
        raise ConfigError(f"{public_key}: the SuperLink did not accept this site key (flwr supernode register "
                          f"exited with {completed.returncode}); it must be a NIST P-384 EC public key in OpenSSH "
                          "format (ssh-keygen -t ecdsa -b 384)")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def flwr_run(work: Path, pyproject: str, connection: str, run_config: dict[str, Any], env: dict[str, str], *,
             timeout: float, on_line: Callable[[str], None] | None = None) -> None:
    """``flwr run <app> <connection> --run-config <file> --stream``; each output line to ``on_line`` and
    ``work/flwr_run.log``.  Raises :class:`FederationError` on a non-zero exit or after ``timeout`` s."""
    app_dir = work / "app"
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(pyproject)
    config_file = work / "run_config.toml"
    config_file.write_text(toml_table(run_config))
    args = [executable("flwr"), "run", str(app_dir), connection, "--run-config", str(config_file), "--stream"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)

    def pump() -> None:
        assert proc.stdout is not None
        with (work / "flwr_run.log").open("wb") as log:
            for raw in proc.stdout:
                log.write(raw)
                log.flush()
                if on_line is not None:
                    with contextlib.suppress(Exception):
                        on_line(_ANSI.sub("", raw.decode(errors="replace")).rstrip())

    reader = threading.Thread(target=pump, name="flwr-run-output", daemon=True)
    reader.start()
    try:
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise FederationError(f"flwr run did not finish within {timeout:.0f} s (logs: {work})") from None
    finally:
        if proc.poll() is None:
            Processes.signal(proc, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            Processes.signal(proc, signal.SIGKILL)
            proc.wait()
        reader.join(timeout=10)
    if code != 0:
        raise FederationError(f"flwr run exited with code {code} (logs: {work})")
