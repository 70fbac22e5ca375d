"""``omopfl train --site ADAPTER --superlink HOST:PORT``: a Flower SuperNode serving one site.

The SuperNode is Flower's own (``flower-supernode``'s entry point, run in this process) with:

* node config ``site-config='<adapter>' prepared-dir='<folder>'`` (paths, never a secret; the
  adapter's database password stays in the environment variable the adapter names), plus
  ``worker-socket`` when the long-lived worker runs (:mod:`omopfl.federation.site.worker`);
* TLS (``--root-certificates``) or ``--insecure``, and SuperNode authentication keys, passed through;
* a Runtime API port of its own (a free local port unless given), so several sites can share a
  machine;
* shorter polling (``poll_seconds``): Flower's SuperNode (1.41, 1.42) sleeps a hard-coded 3 s whenever the
  SuperLink has no message for it and 0.5 s while it waits for its ClientApp's reply.  On the Flower
  version this was checked against (:data:`omopfl.federation.flower_internals.CHECKED_FLOWER_VERSIONS`)
  those sleeps are capped at ``poll_seconds``; on any other version the site does not serve at all
  (its code gate needs the checked runtime).
  The SuperExec's task poll is Flower's own setting ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``; the retry
  backoff of pulling a message's objects (1 s, doubling, when a message is seen before all its objects
  arrived) starts at 20 ms.

Every message runs omopfl's site runtime, never Flower's ``flwr-clientapp``: the SuperNode is started
with ``--isolation process`` and omopfl's SuperExec (:mod:`omopfl.federation.site.superexec`) beside it,
which forks (tuned) or starts (stock polling) :mod:`omopfl.federation.site.runtime` for each task.
That runtime checks the coordinator's app bundle and serves the message through the site's trust
boundary (:mod:`omopfl.federation.site.app`).  On a Flower version omopfl was not checked against
the site refuses to start (:mod:`omopfl.federation.flower_internals`).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from omopfl.federation.processes import TASK_POLL_SECONDS, flower_env, free_port, node_config_text

__all__ = ["serve_site", "DEFAULT_POLL_SECONDS"]

_log = logging.getLogger("omopfl.federation")

DEFAULT_POLL_SECONDS = 0.1


def serve_site(adapter: Path, superlink: str, prepared_dir: Path, *, root_certificates: Path | None = None,
               insecure: bool = False, auth_keys: tuple[Path, Path | None] | None = None,
               runtime_port: int | None = None,
               poll_seconds: float | None = DEFAULT_POLL_SECONDS, worker: bool = True,
               max_wait_time: float | None = None) -> None:
    """Run the site's SuperNode until it is stopped (SIGTERM/SIGINT) or gives up connecting.

    Parameters
    ----------
    adapter, prepared_dir:
        The site's adapter TOML and the folder ``omopfl prepare`` wrote ``<site>/`` into.
    superlink:
        ``HOST:PORT`` of the SuperLink.
    root_certificates, insecure:
        TLS with this CA certificate (PEM), or no TLS (``insecure``, loopback and tests only).
    auth_keys:
        ``(private, public or None)`` SuperNode authentication key files (needs TLS); the server
        registers the site's public key (``omopfl server --site-key``).
    runtime_port:
        Port of the SuperNode's local Runtime API (default: a free one).
    poll_seconds:
        Cap on the SuperNode's idle sleeps; None keeps Flower's stock polling.
    worker:
        Run train/evaluate in this long-lived process (:mod:`omopfl.federation.site.worker`).
    max_wait_time:
        Give up after this many seconds without reaching the SuperLink (default: keep trying).
    """
    from omopfl.federation import flower_internals
    from omopfl.federation.site.superexec import require_checked_flower
    from omopfl.federation.site.worker import SiteWorker

    require_checked_flower()  # fail closed: the site's code gate needs omopfl's own ClientApp runtime
    os.environ.update(flower_env(dict(os.environ), tuned=poll_seconds is not None))
    if poll_seconds is None:
        os.environ.pop("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", None)  # Flower's default
    else:
        os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", str(TASK_POLL_SECONDS))
    warm = poll_seconds is not None and flower_internals.tune_supernode_polling(poll_seconds)
    if poll_seconds is not None and not warm:
        _log.warning("Flower %s: SuperNode polling not tuned (checked against %s only)",
                     flower_internals.installed_version(),
                     ", ".join(flower_internals.CHECKED_FLOWER_VERSIONS))
    site_worker = SiteWorker({"site-config": str(Path(adapter).resolve()),
                              "prepared-dir": str(Path(prepared_dir).resolve())}).start() if worker else None
    executor = None
    try:
        extra = {"worker-socket": site_worker.socket_path} if site_worker else None
        port = runtime_port or free_port()
        # Flower's SuperNode never starts a ClientApp itself (--isolation process): omopfl's SuperExec
        # does, and runs omopfl's site runtime for every message (omopfl.federation.site.superexec).
        args = ["flower-supernode", "--superlink", superlink,
                "--node-config", node_config_text(adapter, prepared_dir, extra),
                "--host", "127.0.0.1", "--port", str(port), "--isolation", "process"]
        executor = subprocess.Popen(
            [sys.executable, "-I", "-m", "omopfl.federation.site.superexec", "--runtime-api-address",
             f"127.0.0.1:{port}", "--insecure", "--parent-pid", str(os.getpid()),
             "--fork" if warm else "--subprocess", *([] if worker or not warm else ["--preload-torch"])],
            stdin=subprocess.DEVNULL)
        args += ["--insecure"] if insecure else ["--root-certificates", str(root_certificates)]
        if auth_keys:
            args += ["--auth-supernode-private-key", str(auth_keys[0])]
            if auth_keys[1] is not None:  # deprecated by Flower: it derives the public key
                args += ["--auth-supernode-public-key", str(auth_keys[1])]
        if max_wait_time is not None:
            args += ["--max-wait-time", str(float(max_wait_time))]
        flower_internals.run_supernode(args)
    finally:
        if executor is not None and executor.poll() is None:  # our child, stopped by its PID
            executor.terminate()
            try:
                executor.wait(timeout=10)
            except subprocess.TimeoutExpired:
                executor.kill()
                executor.wait()
        if site_worker is not None:
            site_worker.stop()
