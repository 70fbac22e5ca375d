"""The Flower internals a site's ClientApp process and SuperExec use, behind one version gate.

Flower has no public API for "run this installed ClientApp for a task, but do not install or import
the run's app bundle", which is what a site needs (:mod:`omopfl.federation.site.runtime`).  This module
wraps the pieces of Flower's own ``flwr-clientapp`` runtime (``flwr.supernode.runtime.run_clientapp``:
the Runtime API client, pulling the task input and the message, pushing the reply and the task status,
heartbeats, signal handlers) and Flower's SuperExec loop with an executor of omopfl's
(:func:`site_executor`), so that the rest of the package does not touch them.

Every use checks :data:`CHECKED_FLOWER_VERSIONS` first and fails closed (:class:`FlowerVersionError`)
on any other Flower version: a site then refuses to serve rather than fall back to Flower's
``flwr-clientapp``, which would run the coordinator's code.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

from omopfl.errors import FederationError

__all__ = ["superlink_task_identity", "delivered_message",
           "CHECKED_FLOWER_VERSIONS", "FlowerVersionError", "check_version", "clientapp_runtime", "site_executor",
           "run_site_superexec", "shorten_clientapp_pulls", "PULL_BACKOFF_SECONDS", "is_checked",
           "tune_supernode_polling", "shorten_grid_pulls"]

PULL_BACKOFF_SECONDS = (0.02, 0.25)
"""(initial, cap) of the retry backoff while a message's objects are still arriving (Flower: 1 s doubling)."""

CHECKED_FLOWER_VERSIONS = ("1.41.0",)
"""Flower versions whose ClientApp runtime and SuperExec internals this module was checked against."""


class FlowerVersionError(FederationError):
    """The installed Flower is not one omopfl's site runtime was checked against."""


def is_checked() -> bool:
    """Is the installed Flower one this module was checked against (the one gate of every patch here)?"""
    import flwr

    return str(getattr(flwr, "__version__", "")) in CHECKED_FLOWER_VERSIONS


def check_version() -> str:
    """The installed Flower version, if omopfl's site runtime was checked against it; else FlowerVersionError."""
    import flwr

    version = str(getattr(flwr, "__version__", ""))
    if version not in CHECKED_FLOWER_VERSIONS:
        raise FlowerVersionError(
            f"Flower {version or '(unknown)'} is installed; omopfl's site runtime was checked against "
            f"{', '.join(CHECKED_FLOWER_VERSIONS)} only: install a checked version (pip install 'flwr==1.41.0'); "
            "a site does not serve on an unchecked Flower")
    return version


def clientapp_runtime() -> types.SimpleNamespace:
    """Flower's ClientApp-process runtime pieces (see the module docstring)."""
    check_version()
    from flwr.common.constant import SubStatus
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.exit import register_signal_handlers
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.telemetry import EventType
    from flwr.supernode.runtime import run_clientapp as flower

    invokers: dict[int, Any] = {}

    def make_client(address: str, token: str, insecure: bool, certificates: bytes | None) -> Any:
        invoker = make_simple_http_retry_invoker()
        client = RuntimeHttpClient.from_server_address(
            server_address=address, insecure=insecure, root_certificates=certificates,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                          RuntimeTokenHttpInterceptor(token)],
            retry_invoker=invoker)
        invokers[id(client)] = invoker
        return client

    def limit_retries(client: Any) -> None:
        if id(client) in invokers:
            invokers[id(client)].max_tries = 1

    def start_heartbeat(client: Any) -> Any:
        sender = HeartbeatSender(make_task_heartbeat_fn_http(client))
        sender.start()
        return sender

    def signal_handlers(on_exit: Any) -> None:
        register_signal_handlers(event_type=EventType.FLWR_CLIENTAPP_RUN_LEAVE, exit_message="Task stopped.",
                                 exit_handlers=[on_exit])

    return types.SimpleNamespace(
        make_client=make_client, limit_retries=limit_retries, start_heartbeat=start_heartbeat,
        register_signal_handlers=signal_handlers, start_parent_process_monitor=start_parent_process_monitor,
        pull_task_input=flower.pull_task_input, push_message=flower.push_message,
        push_task_output=flower.push_task_output, COMPLETED=SubStatus.COMPLETED, FAILED=SubStatus.FAILED)


def _task_args(spec: Any) -> list[str]:
    args = ["--runtime-api-address", spec.runtime_api_address, "--token", spec.token]
    if spec.insecure:
        args.append("--insecure")
    elif spec.root_certificates_path is not None:
        args += ["--root-certificates", spec.root_certificates_path]
    if spec.parent_pid is not None:
        args += ["--parent-pid", str(spec.parent_pid)]
    return args


def site_executor(*, fork: bool, run_task: Callable[[list[str]], None], module: str) -> Any:
    """A SuperExec executor that runs every ClientApp task as omopfl's site runtime, never ``flwr-clientapp``.

    ``fork``: ``run_task(args)`` in a fork of this (pre-imported) process; otherwise a fresh
    ``python -I -m <module> args``.  Tasks of any other type are refused.  (The runtime is passed in:
    this module imports nothing of omopfl's that it could not be checked without.)
    """
    check_version()
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
    from flwr.supercore.superexec.executor.types import LaunchResult

    class SiteExecutor(SubprocessExecutor):
        def __init__(self) -> None:
            self.children: set[int] = set()
            self.processes: list[subprocess.Popen] = []

        def get_eligible_capacity(self, supported_task_types: set[Any], **_kwargs: Any) -> tuple[set[Any], set[str]]:
            return {t for t in supported_task_types if t == TaskType.CLIENT_APP}, set()

        def launch(self, spec: Any) -> Any:
            if spec.task_type != TaskType.CLIENT_APP:
                return LaunchResult.failed("omopfl sites run ClientApp tasks only")
            args = _task_args(spec)
            if not fork:
                self.processes.append(subprocess.Popen(
                    [sys.executable, "-I", "-m", module, *args], stdin=subprocess.DEVNULL))
                return LaunchResult.accepted()
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # the child: omopfl's site runtime, then leave without the parent's exit handlers
                code = 1
                try:
                    run_task(args)
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
            self.processes = [p for p in self.processes if p.poll() is None]

        def close(self) -> None:
            self.reconcile()

    return SiteExecutor()


def shorten_clientapp_pulls() -> None:
    """A forked ClientApp task starts before its SuperNode has stored the message's objects; Flower's pull
    then backs off 1 s (doubling to 10 s).  Retry sooner: the objects are arriving over loopback."""
    import functools

    check_version()
    from flwr.supernode.runtime import run_clientapp

    original = run_clientapp.pull_and_inflate_object_from_tree
    if isinstance(original, functools.partial):
        return
    run_clientapp.pull_and_inflate_object_from_tree = functools.partial(  # type: ignore[attr-defined]
        original, initial_backoff=PULL_BACKOFF_SECONDS[0], backoff_cap=PULL_BACKOFF_SECONDS[1])


def run_site_superexec(address: str, *, insecure: bool, root_certificates: str | None, parent_pid: int | None,
                       fork: bool, run_task: Callable[[list[str]], None], module: str) -> None:
    """Flower's SuperExec loop with :func:`site_executor` (until the SuperNode or this process stops)."""
    check_version()
    from flwr.supercore.superexec import run_superexec as superexec

    executor = site_executor(fork=fork, run_task=run_task, module=module)
    superexec.get_executor = lambda *_args, **_kwargs: executor  # type: ignore[attr-defined]
    superexec.run_superexec(runtime_api_address=address, insecure=insecure,
                            root_certificates_path=root_certificates, parent_pid=parent_pid)


@contextlib.contextmanager
def superlink_task_identity(run_id: int, node_id: int | None = None) -> Iterator[None]:
    """Messages take their sender from the process's task identity (set by ``flwr-serverapp`` in a deployment):
    set it (node ``node_id``, default the SuperLink's) for an in-process run of a ServerApp, then restore it."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity._task_id, TaskIdentity._run_id = 1, int(run_id)
    TaskIdentity._node_id = SUPERLINK_NODE_ID if node_id is None else int(node_id)
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


class _CappedSleepTime(types.SimpleNamespace):
    """The ``time`` module as seen by Flower's SuperNode loop, with ``sleep`` capped."""

    def __init__(self, cap: float) -> None:
        super().__init__()
        self._cap = cap

    def sleep(self, seconds: float) -> None:
        import time

        time.sleep(min(float(seconds), self._cap))

    def __getattr__(self, name: str) -> Any:
        import time

        return getattr(time, name)


def tune_supernode_polling(poll_seconds: float) -> bool:
    """Cap Flower's SuperNode idle sleeps (hard-coded 3 s / 0.5 s) at ``poll_seconds`` and retry a message's
    objects sooner (:data:`PULL_BACKOFF_SECONDS`); False (stock SuperNode) on an unchecked Flower."""
    import functools

    if not is_checked():
        return False
    from flwr.supernode import start_client_internal

    if not hasattr(start_client_internal, "time"):
        return False
    start_client_internal.time = _CappedSleepTime(poll_seconds)  # type: ignore[attr-defined]
    # A message is visible before the server has pushed all its objects; Flower's pull then backs
    # off 1 s (doubling to 10 s).  Retry sooner (the same race is handled on the server's side).
    start_client_internal.pull_objects = functools.partial(  # type: ignore[attr-defined]
        start_client_internal.pull_objects, initial_backoff=PULL_BACKOFF_SECONDS[0],
        backoff_cap=PULL_BACKOFF_SECONDS[1])
    return True


def shorten_grid_pulls(grid: Any) -> bool:
    """Retry a reply's objects sooner on Flower's HTTP grid (the coordinator's side of the same race).

    A reply becomes visible to ``pull_messages`` as soon as the SuperNode has sent its metadata, while its
    objects (the weights) are still being pushed; Flower's pull then backs off 1 s, doubling to 10 s.
    Over a fast link the objects arrive within milliseconds: retry after 20 ms, at most 250 ms apart.
    """
    import functools

    if not is_checked():
        return False
    try:
        from flwr.superlink.grid import http_grid
    except ImportError:
        return False
    if not isinstance(grid, http_grid.HttpGrid) or isinstance(http_grid.pull_objects, functools.partial):
        return False
    http_grid.pull_objects = functools.partial(http_grid.pull_objects, initial_backoff=PULL_BACKOFF_SECONDS[0],
                                               backoff_cap=PULL_BACKOFF_SECONDS[1])
    return True


def delivered_message(content: Any, *, dst_node_id: int, message_type: str, message_id: str, run_id: int) -> Any:
    """A Message as a SuperNode hands it to its ClientApp (its id and run set as the SuperLink sets them).

    Needs a task identity (:func:`superlink_task_identity`).  For tests and in-process delivery only."""
    from flwr.app import Message

    message = Message(content, dst_node_id=dst_node_id, message_type=message_type)
    message.metadata.__dict__.update({"_message_id": str(message_id), "_run_id": int(run_id)})
    return message
