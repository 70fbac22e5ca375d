"""Every Flower internal omopfl touches, behind one version gate; imports nothing of omopfl.

The rest of the package uses Flower's public API only (``flwr.app``, ``flwr.clientapp``,
``flwr.serverapp``, ``flwr.serverapp.strategy``, ``flwr.simulation``; ``tests/test_architecture.py``
checks).  What is here, and why Flower's public API does not cover it:

* the site's ClientApp process and SuperExec (below);
* the SuperNode's command-line entry (:func:`run_supernode`) and its polling (:func:`tune_supernode_polling`),
  the coordinator's HTTP grid pulls (:func:`shorten_grid_pulls`);
* Flower's wire serialization: bytes of a RecordDict for the site worker's socket and for byte counts
  (:func:`recorddict_to_bytes`, :func:`recorddict_from_bytes`, :func:`content_bytes`, :func:`wire_bytes`);
* an in-process Grid (:class:`InProcessGrid`) and the task identity of an in-process ServerApp
  (:func:`superlink_task_identity`, :func:`delivered_message`).

Flower has no public API for "run this installed ClientApp for a task, but do not install or import
the run's app bundle", which is what a site needs (:mod:`omopfl.federation.site.runtime`).  This module
wraps the pieces of Flower's own ``flwr-clientapp`` runtime (``flwr.supernode.runtime.run_clientapp``:
the Runtime API client, pulling the task input and the message, pushing the reply and the task status,
heartbeats, signal handlers) and Flower's SuperExec loop with an executor of omopfl's
(:func:`site_executor`), so that the rest of the package does not touch them.

Every patch checks :data:`CHECKED_FLOWER_VERSIONS` first.  The site's runtime fails closed
(:class:`UncheckedFlowerError`; omopfl's entry points check :func:`version_problem` first and raise
:class:`omopfl.errors.FlowerVersionError`) on any other Flower version: a site then refuses to serve
rather than fall back to Flower's ``flwr-clientapp``, which would run the coordinator's code.  The
speed-ups (polling, pulls) are skipped on an unchecked version.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from uuid import uuid4

from flwr.serverapp import Grid

__all__ = ["superlink_task_identity", "delivered_message", "CHECKED_FLOWER_VERSIONS", "UncheckedFlowerError",
           "version_problem", "installed_version", "check_version", "clientapp_runtime", "site_executor",
           "run_site_superexec", "shorten_clientapp_pulls", "PULL_BACKOFF_SECONDS", "is_checked",
           "tune_supernode_polling", "shorten_grid_pulls", "run_supernode", "preload_clientapp_runtime",
           "recorddict_to_bytes", "recorddict_from_bytes", "content_bytes", "wire_bytes", "InProcessGrid",
           "set_message_id"]

PULL_BACKOFF_SECONDS = (0.02, 0.25)
"""(initial, cap) of the retry backoff while a message's objects are still arriving (Flower: 1 s doubling)."""

CHECKED_FLOWER_VERSIONS = ("1.41.0", "1.42.0")
"""Flower versions whose ClientApp runtime and SuperExec internals this module was checked against."""


class UncheckedFlowerError(RuntimeError):
    """The installed Flower is not one this module was checked against (the site runtime fails closed)."""


def installed_version() -> str:
    """The installed Flower's version string (``""`` if it has none)."""
    import flwr

    return str(getattr(flwr, "__version__", ""))


def is_checked() -> bool:
    """Is the installed Flower one this module was checked against (the one gate of every patch here)?"""
    return installed_version() in CHECKED_FLOWER_VERSIONS


def version_problem() -> str:
    """``""`` if the installed Flower was checked; else one line saying what is installed and what to do."""
    if is_checked():
        return ""
    return (f"Flower {installed_version() or '(unknown)'} is installed; omopfl's site runtime was checked against "
            f"{', '.join(CHECKED_FLOWER_VERSIONS)} only: install a checked version "
            f"(pip install 'flwr=={CHECKED_FLOWER_VERSIONS[-1]}'); a site does not serve on an unchecked Flower")


def check_version() -> str:
    """The installed Flower version if it was checked; else :class:`UncheckedFlowerError`."""
    problem = version_problem()
    if problem:
        raise UncheckedFlowerError(problem)
    return installed_version()


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
    message.metadata.__dict__["_run_id"] = int(run_id)
    set_message_id(message, str(message_id))
    return message


def set_message_id(message: Any, message_id: str | None = None) -> str:
    """Give a message the id a SuperLink would (a new one by default); returns it."""
    message.metadata.__dict__["_message_id"] = message_id or uuid4().hex
    return message.metadata.message_id


# --------------------------------------------------------------------------------------------
# the SuperNode, the ClientApp runtime's imports
# --------------------------------------------------------------------------------------------


def run_supernode(args: list[str]) -> None:
    """Flower's ``flower-supernode`` command with ``args`` (``args[0]`` is the program name), in this process."""
    check_version()
    from flwr.supernode.cli.flower_supernode import flower_supernode

    saved, sys.argv = sys.argv, list(args)
    try:
        flower_supernode()
    finally:
        sys.argv = saved


def preload_clientapp_runtime() -> None:
    """Import what Flower's ClientApp runtime needs for every message (a forked task inherits it)."""
    check_version()
    import flwr.common.serde
    import flwr.supernode.runtime.run_clientapp  # noqa: F401


# --------------------------------------------------------------------------------------------
# Flower's wire serialization
# --------------------------------------------------------------------------------------------


def recorddict_to_bytes(content: Any) -> bytes:
    """A RecordDict as Flower serializes it (protobuf)."""
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(content).SerializeToString()


def recorddict_from_bytes(data: bytes) -> Any:
    """The RecordDict :func:`recorddict_to_bytes` wrote (ValueError-like protobuf errors on bad bytes)."""
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # type: ignore[attr-defined]

    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto)


def content_bytes(message: Any) -> int:
    """Serialized size of a message's content (0 for an error reply)."""
    from flwr.common.serde import recorddict_to_proto

    if message.has_error():
        return 0
    return int(recorddict_to_proto(message.content).ByteSize())


def wire_bytes(content: Any) -> int:
    """Bytes of a RecordDict as Flower sends it (the deflated objects of its object tree)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


# --------------------------------------------------------------------------------------------
# in-process grid
# --------------------------------------------------------------------------------------------


class InProcessGrid(Grid):
    """A Flower ``Grid`` whose nodes are ClientApps in this process (no network, no Ray).

    Each message and each reply goes through ``message_to_proto``/``message_from_proto``, so
    only what Flower can put on the wire reaches the other side; each node keeps its own
    ``Context`` (node config, state) across messages, as a SuperNode does.
    """

    def __init__(self, client_app: Any, node_configs: Iterable[dict[str, Any]], run_config: dict[str, Any],
                 run_id: int | None = None) -> None:
        from flwr.app import Context, RecordDict
        from flwr.supercore.run import Run

        self._run = Run.create_empty(run_id if run_id is not None else int(uuid4().int % (1 << 63)))
        self._app = client_app
        self._contexts = {}
        for i, node_config in enumerate(node_configs):
            node_id = 1000 + i
            self._contexts[node_id] = Context(run_id=self._run.run_id, node_id=node_id, node_config=dict(node_config),
                                              state=RecordDict(), run_config=dict(run_config))
        self._replies: dict[str, Any] = {}

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, content: Any, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Any:
        from flwr.app import Message

        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self._contexts)

    def context(self, node_id: int) -> Any:
        """The node's Context (its state holds what the ClientApp kept)."""
        return self._contexts[node_id]

    def lose(self, message: Any) -> str:
        """Accept a message as the link would and never answer it (a node gone mid-run); returns its id."""
        return set_message_id(message)

    def push_messages(self, messages: Iterable[Any]) -> list[str]:
        from flwr.app import Error, Message
        from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
        from flwr.common.serde import message_from_proto, message_to_proto

        ids = []
        for message in messages:
            message.metadata.__dict__.update({"_message_id": uuid4().hex, "_run_id": self._run.run_id,
                                              "_src_node_id": SUPERLINK_NODE_ID})
            received = message_from_proto(message_to_proto(message))
            context = self._contexts.get(received.metadata.dst_node_id)
            if context is None:
                reply = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="node unavailable"), reply_to=received)
            else:
                try:
                    reply = self._app(received, context)
                except Exception:  # as a SuperNode does: an error reply (here without the text)
                    reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="ClientApp raised"),
                                    reply_to=received)
            set_message_id(reply)
            self._replies[message.metadata.message_id] = message_from_proto(message_to_proto(reply))
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Any]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> list[Any]:
        return self.pull_messages(self.push_messages(messages))
