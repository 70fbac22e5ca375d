"""A site's long-lived ClientApp worker: the SuperNode's train/evaluate work without a process per message.

Flower's SuperNode (1.41, 1.42) runs every message in a new ``flwr-clientapp`` process, which would pay for
starting Python, importing torch and loading the prepared dataset on every message (seconds each
time).  ``omopfl train --site`` therefore starts this worker next to the SuperNode: a thread of the
same long-lived process, listening on a Unix socket in a fresh folder only the site's user can
enter (mode 0700).  The ClientApp handlers (:func:`omopfl.federation.site.app.handle`) forward
the message content and the context state to it; the worker runs the very same handler functions
with torch imported and the dataset cached (:func:`omopfl.federation.site.training._tensors_and_split`).

It is local inter-process communication at the site, not a network service: the socket is a file
path, nothing listens on a port, and the node config the worker uses is its own (the request cannot
point it at another dataset).  Frames are ``!Q`` length-prefixed: a JSON header, then Flower's own
protobuf serialisation of the content and state record dicts.  A failure comes back as a fixed
error code (:data:`omopfl.federation.codec.ERROR_CODES`), never as text.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import socketserver
import struct
import tempfile
import threading
from pathlib import Path
from typing import Any

from omopfl.errors import WorkerUnavailable

__all__ = ["SiteWorker", "WorkerUnavailable", "call", "handle", "SOCKET_NAME"]

_log = logging.getLogger("omopfl.worker")

SOCKET_NAME = "worker.sock"
_LENGTH = struct.Struct("!Q")
_MAX_FRAME = 1 << 32


def _send_frames(sock: socket.socket, *frames: bytes) -> None:
    sock.sendall(b"".join(_LENGTH.pack(len(f)) + f for f in frames))


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            raise ConnectionError("connection closed")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _recv_frame(sock: socket.socket) -> bytes:
    (size,) = _LENGTH.unpack(_recv_exact(sock, _LENGTH.size))
    if size > _MAX_FRAME:
        raise ConnectionError("frame too large")
    return _recv_exact(sock, size)


def call(socket_path: str, message_type: str, content: Any, context: Any, timeout: float = 3600.0) -> Any:
    """Run ``message_type`` on ``content`` in the worker; returns the reply RecordDict.

    Raises :class:`WorkerUnavailable` if nothing answers at ``socket_path`` and
    :class:`omopfl.federation.site.statistics.SiteFailure` with the worker's fixed code if it failed.
    """
    from omopfl.errors import SiteFailure
    from omopfl.federation.flower_internals import recorddict_from_bytes, recorddict_to_bytes

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(5.0)
        try:
            sock.connect(socket_path)
        except OSError:
            raise WorkerUnavailable(socket_path) from None
        sock.settimeout(timeout)
        header = json.dumps({"type": message_type}).encode()
        _send_frames(sock, header, recorddict_to_bytes(content), recorddict_to_bytes(context.state))
        status = json.loads(_recv_frame(sock))
        body = _recv_frame(sock)
    finally:
        sock.close()
    if status.get("code"):
        raise SiteFailure(str(status["code"]))
    return recorddict_from_bytes(body)


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        from flwr.app import Context

        from omopfl.errors import wire_code
        from omopfl.federation.flower_internals import recorddict_from_bytes, recorddict_to_bytes
        from omopfl.federation.site import training as site_train

        try:
            header = json.loads(_recv_frame(self.request))
            records = [recorddict_from_bytes(_recv_frame(self.request)) for _ in range(2)]
        except (ConnectionError, ValueError, OSError) as exc:
            _log.warning("omopfl worker: bad request (%s)", type(exc).__name__)
            return
        content, state = records
        handler = site_train.HANDLERS.get(str(header.get("type")))
        context = Context(run_id=0, node_id=0, node_config=dict(self.server.node_config), state=state,
                          run_config={})
        with self.server.lock:  # one message at a time, as a SuperNode does
            try:
                if handler is None:
                    raise ValueError("unknown message type")
                reply = recorddict_to_bytes(handler(content, context))
                status = {"code": ""}
            except Exception as exc:  # only a fixed code leaves this process
                status = {"code": "bad_request" if handler is None else wire_code(exc)}
                reply = b""
                _log.error("omopfl worker %s failed: %s (%s)", header.get("type"), status["code"],
                           type(exc).__name__)
        with contextlib.suppress(OSError):
            _send_frames(self.request, json.dumps(status).encode(), reply)


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, node_config: dict[str, str]) -> None:
        super().__init__(path, _Handler)
        self.node_config = node_config
        self.lock = threading.Lock()


class SiteWorker:
    """The worker of one site: ``start()`` it, put :attr:`socket_path` in the node config, ``stop()`` it.

    Parameters
    ----------
    node_config:
        The site's node config (``site-config``, ``prepared-dir``); requests cannot change it.
    warm:
        Import torch and the models in the background as soon as it starts.
    """

    def __init__(self, node_config: dict[str, str], *, warm: bool = True) -> None:
        self.node_config = {k: v for k, v in node_config.items() if k != "worker-socket"}
        self.warm = warm
        self._folder: Path | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def socket_path(self) -> str:
        if self._folder is None:
            raise RuntimeError("the worker is not started")
        return str(self._folder / SOCKET_NAME)

    def start(self) -> SiteWorker:
        self._folder = Path(tempfile.mkdtemp(prefix="omopfl-worker-"))
        os.chmod(self._folder, 0o700)
        self._server = _Server(self.socket_path, self.node_config)
        os.chmod(self.socket_path, 0o600)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="omopfl-worker", daemon=True)
        self._thread.start()
        if self.warm:
            threading.Thread(target=_warm, name="omopfl-worker-warm", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def __enter__(self) -> SiteWorker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _warm() -> None:
    """Import what the first train/evaluate needs (torch, scikit-learn's metrics, the data loader)."""
    with contextlib.suppress(Exception):
        import sklearn.metrics  # noqa: F401
        import torch  # noqa: F401

        import omopfl.federation.site.training
        import omopfl.models
        import omopfl.prepare  # noqa: F401


def handle(message_type: str, content: Any, context: Any) -> Any:
    """Run an admitted ``train``/``evaluate`` here, or in the node's long-lived worker if it has one
    (torch loaded, tensors cached)."""
    from omopfl.federation.site import training as site_train

    socket_path = context.node_config.get("worker-socket")
    if isinstance(socket_path, str) and socket_path:
        try:
            return call(socket_path, message_type, content, context)
        except WorkerUnavailable:
            _log.warning("omopfl: the site worker is not reachable; running %s in this process", message_type)
    return site_train.HANDLERS[message_type](content, context)
