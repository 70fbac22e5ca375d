"""omopfl's ClientApp process at a site: what runs for every message instead of Flower's ``flwr-clientapp``.

Flower's ``flwr-clientapp`` pulls the message and the run's app bundle (FAB) from the SuperNode,
extracts the bundle into ``$FLWR_HOME/apps/<publisher>.<app>.<version>.<hash>/``, puts that folder on
``sys.path`` and imports whatever ``[tool.flwr.app.components] clientapp`` names, so the coordinator
decides which code runs at the site (and a bundle that ships a package named like one of the site's
own modules shadows it).  Flower's FAB verification (``flower-supernode --trusted-entities``) does not
change that: it checks that a trusted publisher signed the bundle (signatures that only Flower's
platform issues), not what the bundle contains or which component it names, and a coordinator that
builds its own bundle is the case to defend against.

This process uses the same Runtime API calls (pull the task input and the message, push the reply
and the task's status) but:

1. checks the bundle's bytes in memory with :func:`omopfl.federation.site.bundle.check_bundle`
   (only a ``pyproject.toml`` naming omopfl's own component, nothing else); a bundle that fails
   gets a refusal code back and nothing of it is extracted, put on the import path or imported;
2. never extracts or installs the bundle: the ClientApp that runs is the one installed with omopfl,
   :func:`omopfl.federation.site.app.serve` (the site's trust boundary);
3. is started with ``python -I`` (no current folder, no ``PYTHONPATH`` or user site on the import
   path) when it runs as a subprocess, or forked from omopfl's SuperExec, whose import path is the
   same.

:mod:`omopfl.federation.site.superexec` starts it for every ClientApp task, in every mode of
``omopfl train --site`` (with or without the worker, tuned or stock polling).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

__all__ = ["run_task", "main"]

_log = logging.getLogger("omopfl.site")


def run_task(runtime_api_address: str, token: str, insecure: bool, certificates: bytes | None = None,
             parent_pid: int | None = None) -> int:
    """Serve one ClientApp task (one message) through the site's trust boundary; the process exit code."""
    from omopfl.federation.flower_internals import clientapp_runtime

    rt = clientapp_runtime()
    if parent_pid is not None:
        rt.start_parent_process_monitor(parent_pid)
    client = rt.make_client(runtime_api_address, token, insecure, certificates)
    state: dict[str, Any] = {"context": None, "status": rt.FAILED, "details": "omopfl site task failed"}
    heartbeat = None

    def on_exit() -> None:
        rt.limit_retries(client)
        rt.push_task_output(client, state["context"], state["status"], state["details"])
        if heartbeat is not None and heartbeat.is_running:
            heartbeat.stop()
        client.close()

    rt.register_signal_handlers(on_exit)
    code = 0
    reply = None
    try:
        heartbeat = rt.start_heartbeat(client)
        message, context, _run, fab = rt.pull_task_input(client)
        state["context"] = context
        from omopfl.federation.site import app as site_app
        from omopfl.federation.site import bundle as site_bundle

        refusal = site_bundle.check_bundle(fab.content)
        reply = site_app.refuse(message, context, refusal) if refusal else site_app.serve(message, context)
        state["status"], state["details"] = rt.COMPLETED, ""
    except Exception as exc:  # no text leaves: the coordinator sees a failed task and no reply
        _log.error("omopfl site task failed (%s)", type(exc).__name__)
        code = 1
    finally:
        if reply is not None and state["context"] is not None:
            try:
                rt.push_message(client, reply, state["context"])
            except Exception as exc:
                _log.error("omopfl site: the reply could not be pushed (%s)", type(exc).__name__)
                code = 1
    on_exit()
    return code


def main(argv: list[str] | None = None) -> None:
    """``python -I -m omopfl.federation.site.runtime`` with the arguments Flower passes to ``flwr-clientapp``."""
    parser = argparse.ArgumentParser(description="omopfl's ClientApp process at a site")
    parser.add_argument("--clientappio-api-address", "--runtime-api-address", dest="address", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--root-certificates")
    parser.add_argument("--parent-pid", type=int)
    parser.add_argument("--allow-runtime-dependency-installation", action="store_true")  # ignored: nothing installs
    args = parser.parse_args(argv)
    certificates = None
    if args.root_certificates:
        with open(args.root_certificates, "rb") as fh:
            certificates = fh.read()
    raise SystemExit(run_task(args.address, args.token, args.insecure, certificates, args.parent_pid))


if __name__ == "__main__":
    main()
