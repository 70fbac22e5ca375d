"""A warm SuperExec for a site's SuperNode: every ClientApp message in a fork of a process that has
already imported Flower, omopfl and torch.

Flower 1.41's SuperExec (``flower-superexec``) starts a fresh ``flwr-clientapp`` process for every
message; on a small machine starting Python and importing Flower, numpy and torch costs one to
several seconds per message, which dominates a round.  This is Flower's own SuperExec loop
(``run_superexec``: the same Runtime API calls, tokens and task bookkeeping) with one change: the
executor that starts a ClientApp task forks this pre-imported process and runs Flower's own
``flwr-clientapp`` entry point in the child, with the same arguments the stock executor would pass
on the command line.  Each message still gets its own process (a crash cannot take the node down)
and Flower's ClientApp runtime is unchanged; only the start-up is paid once.  Other task types go
to the stock executor.

It runs beside a SuperNode started with ``--isolation process`` (:func:`omopfl.federation.supernode.serve_site`
does both), only on the Flower versions it was checked against
(:data:`omopfl.federation.supernode.TUNED_FLOWER_VERSIONS`).

Usage (what ``serve_site`` runs)::

    python -m omopfl.federation.warm_exec --runtime-api-address 127.0.0.1:PORT --insecure --parent-pid PID
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any

__all__ = ["main", "fork_executor"]


def fork_executor() -> Any:
    """A Flower executor that runs ClientApp tasks in forks of this process (others: stock subprocesses)."""
    from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TASK_TYPE_TO_COMMAND, TaskType
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
    from flwr.supercore.superexec.executor.types import LaunchResult
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    class ForkExecutor(SubprocessExecutor):
        def __init__(self) -> None:
            self.children: set[int] = set()

        def launch(self, spec: Any) -> Any:
            if spec.task_type != TaskType.CLIENT_APP:
                return super().launch(spec)
            args = [TASK_TYPE_TO_COMMAND[spec.task_type], TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type],
                    spec.runtime_api_address, "--token", spec.token]
            if spec.insecure:
                args.append("--insecure")
            elif spec.root_certificates_path is not None:
                args += ["--root-certificates", spec.root_certificates_path]
            if spec.parent_pid is not None:
                args += ["--parent-pid", str(spec.parent_pid)]
            if spec.runtime_dependency_install:
                args.append("--allow-runtime-dependency-installation")
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # the child: Flower's flwr-clientapp, then leave without the parent's exit handlers
                code = 1
                try:
                    sys.argv = args
                    flwr_clientapp()
                    code = 0
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                except BaseException:
                    code = 1
                finally:
                    with contextlib.suppress(Exception):
                        sys.stdout.flush()
                        sys.stderr.flush()
                    os._exit(code)
            self.children.add(pid)
            return LaunchResult.accepted()

        def reconcile(self) -> None:
            for pid in list(self.children):
                with contextlib.suppress(ChildProcessError):
                    done, _status = os.waitpid(pid, os.WNOHANG)
                    if not done:
                        continue
                self.children.discard(pid)

        def close(self) -> None:
            self.reconcile()

    return ForkExecutor()


PULL_BACKOFF_SECONDS = (0.02, 0.25)
"""(initial, cap) of the ClientApp's retry backoff while the SuperNode is still receiving the message."""


def _short_pull_backoff() -> None:
    """A forked ClientApp starts before its SuperNode has stored the message's objects; Flower's pull
    then backs off 1 s (doubling to 10 s).  Retry sooner: the objects are arriving over loopback."""
    import functools

    from flwr.supernode.runtime import run_clientapp

    original = run_clientapp.pull_and_inflate_object_from_tree
    run_clientapp.pull_and_inflate_object_from_tree = functools.partial(  # type: ignore[attr-defined]
        original, initial_backoff=PULL_BACKOFF_SECONDS[0], backoff_cap=PULL_BACKOFF_SECONDS[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="omopfl's warm Flower SuperExec for a site's SuperNode")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--root-certificates")
    parser.add_argument("--parent-pid", type=int)
    parser.add_argument("--preload-torch", action="store_true", help="also import torch (no site worker)")
    args = parser.parse_args(argv)

    # What every ClientApp message needs, imported once (the forks inherit it).
    import flwr.common.serde
    import flwr.supernode.cli.flwr_clientapp
    import flwr.supernode.runtime.run_clientapp  # noqa: F401
    from flwr.supercore.superexec import run_superexec as superexec

    import omopfl.federation.site_train
    import omopfl.federation.worker
    import omopfl.prepare  # noqa: F401  (the statistics handlers: pandas)

    if args.preload_torch:  # the handlers run torch in the fork when there is no site worker
        import torch  # noqa: F401

    _short_pull_backoff()
    executor = fork_executor()
    superexec.get_executor = lambda *_args, **_kwargs: executor  # Flower's loop, our executor
    superexec.run_superexec(runtime_api_address=args.runtime_api_address, insecure=args.insecure,
                            root_certificates_path=args.root_certificates, parent_pid=args.parent_pid)


if __name__ == "__main__":
    main()
