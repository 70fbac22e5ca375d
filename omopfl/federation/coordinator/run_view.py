"""The live run view: what the coordinator's ServerApp knows about a run, as a small local web page.

Two halves, joined by one file in the run directory:

* :class:`LiveState` lives in the training ServerApp (:mod:`omopfl.federation.coordinator.training`): the
  grid and the round loop tell it what happens (nodes connected, messages sent, replies received,
  rounds aggregated, sites dropped) and it replaces ``<run dir>/live.json`` atomically, at most every
  :data:`WRITE_INTERVAL` seconds unless something changed.  It never raises: a failure to write the
  view never stops a run.
* :class:`RunView` is a read-only HTTP server in the ``omopfl server`` process (``--view``, off by
  default) or in ``omopfl view RUN_DIR``.  It binds 127.0.0.1 only, answers GET and HEAD only, accepts
  only a loopback ``Host`` header, and serves one page (no external asset: works offline), its script,
  the JSON data endpoints and the run directory's files.

What the view shows is what the ServerApp itself received: site names and fixed status codes from the
sites' replies, the aggregated per-round metrics the run directory also holds, and the server's own
timings (seconds from sending a site its message to its reply).  No per-site count or metric is shown.

Site states (``sites[].state``)
    ``connected`` (answered the statistics query), ``training`` (a round's message is out),
    ``replied`` (its reply for the current exchange came), ``late`` (no reply yet, and twice as long
    as the slowest reply so far or half the round timeout has passed), ``dropped`` (no reply within the
    timeout, or an error: out of the run), ``withheld`` (released no statistics: fewer persons than its
    ``min_cell_count``; it keeps answering with zero weight, so it stays ``withheld``), ``refused``
    (the site declined, with its fixed code in ``reason``), ``failed`` (an error code such as
    ``internal``), ``done`` (the run finished with it).

Endpoints
    ``GET /`` the page; ``/app.js``; ``/api/state`` (everything); ``/api/sites``; ``/api/rounds``;
    ``/api/files``; ``/files/<name>`` (a regular, non-hidden file directly in the run directory).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import mimetypes
import threading
import time
from collections.abc import Iterable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from omopfl.atomic import write_json

__all__ = ["LIVE_FILE", "SITE_STATES", "LiveState", "RunView", "read_state", "list_files", "mark_failed"]

_log = logging.getLogger("flwr.omopfl")

LIVE_FILE = "live.json"
WRITE_INTERVAL = 0.5
SITE_STATES = ("connected", "training", "replied", "late", "dropped", "withheld", "refused", "failed", "done")
FAULT_CODES = frozenset({"internal", "malformed", "duplicate_site", "no_reply"})
"""Stats-phase codes that are faults, not a site's decision (``flower_error_*`` too): state ``failed``."""
_STATS_TYPES = ("query.stats", "query.scaler", "query.secagg")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


class LiveState:
    """The run's live state, written to ``<run dir>/live.json`` (see the module docstring).

    Every public method swallows its own exceptions (logged at debug level): the view is a window on
    the run, never a reason for it to fail.
    """

    def __init__(self, run_dir: Path, *, study: str, rounds: int, expected_sites: int, min_sites: int) -> None:
        self.path = Path(run_dir) / LIVE_FILE
        self._t0 = time.monotonic()
        self._written = 0.0
        self._lock = threading.Lock()
        self._nodes: dict[int, str] = {}  # node id -> site name (from the site's own reply)
        self._exchange: dict[str, Any] = {}
        self.state: dict[str, Any] = {
            "version": 1, "study": study, "phase": "waiting", "round": 0, "rounds": int(rounds),
            "expected_sites": int(expected_sites), "min_sites": int(min_sites), "nodes_connected": 0,
            "started_at": _now(), "updated_at": _now(), "elapsed_seconds": 0.0, "message": "",
            "sites": {}, "metrics": [], "dropped": [], "withheld": [], "refused": [],
        }
        self._write(force=True)

    # -- helpers -------------------------------------------------------------------------------
    def _safe(fn):  # type: ignore[no-untyped-def]  # a decorator, used in the class body only
        def wrapper(self: LiveState, *args: Any, **kwargs: Any) -> None:
            try:
                with self._lock:
                    fn(self, *args, **kwargs)
            except Exception as exc:  # pragma: no cover - the view must never stop a run
                _log.debug("omopfl live view: %s", exc)
        wrapper.__doc__ = fn.__doc__
        return wrapper

    def _site(self, name: str) -> dict[str, Any]:
        return self.state["sites"].setdefault(name, {"site": name, "state": "connected", "reason": "",
                                                     "last_reply_seconds": None, "reply_seconds": {}})

    def _set(self, name: str, state: str, reason: str = "") -> bool:
        site = self._site(name)
        if site["state"] in ("dropped", "refused", "failed") and state not in ("dropped", "refused", "failed"):
            return False  # out of the run: stays so
        if site["state"] == "withheld" and state in ("connected", "training", "replied", "late", "done"):
            return False  # it still answers, but contributes nothing (zero weight): it stays withheld
        changed = (site["state"], site["reason"]) != (state, reason)
        site["state"], site["reason"] = state, reason
        return changed

    def _write(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._written < WRITE_INTERVAL:
            return
        self._written = now
        self.state["updated_at"] = _now()
        self.state["elapsed_seconds"] = round(now - self._t0, 3)
        data = {**self.state, "sites": sorted(self.state["sites"].values(), key=lambda s: s["site"])}
        write_json(self.path, data, default=str, allow_nan=True)

    def _name(self, message: Any) -> str | None:
        node = int(message.metadata.src_node_id)
        if node in self._nodes:
            return self._nodes[node]
        if message.has_error() or message.metadata.message_type not in _STATS_TYPES:
            return None
        from omopfl.federation import codec

        try:
            site = codec.decode_site_reply(message.content).site
        except codec.CodecError:
            return None
        if site:
            self._nodes[node] = site
        return site or None

    # -- what the grid reports ----------------------------------------------------------------
    @_safe
    def nodes_seen(self, count: int) -> None:
        """``grid.get_node_ids()`` returned ``count`` nodes."""
        changed = self.state["nodes_connected"] != int(count)
        self.state["nodes_connected"] = int(count)
        self._write(force=changed)

    @_safe
    def exchange_started(self, message_types: Iterable[str], nodes: Iterable[int], timeout: float | None) -> None:
        """Messages of these types went to these nodes."""
        types = sorted(set(message_types))
        self._exchange = {"types": types, "nodes": {int(n) for n in nodes}, "slowest": 0.0,
                          "timeout": timeout}
        if any(t in _STATS_TYPES for t in types):
            if self.state["phase"] == "waiting":
                self.state["phase"] = "statistics"
        elif self.state["phase"] in ("training", "evaluating"):
            for node in self._exchange["nodes"]:
                if node in self._nodes:
                    self._set(self._nodes[node], "training")
        self._write(force=True)

    @_safe
    def reply(self, message: Any, seconds: float) -> None:
        """A reply came ``seconds`` after its exchange started."""
        name = self._name(message)
        self._exchange.get("nodes", set()).discard(int(message.metadata.src_node_id))
        self._exchange["slowest"] = max(float(self._exchange.get("slowest", 0.0)), float(seconds))
        if name is None:
            return
        site = self._site(name)
        site["last_reply_seconds"] = round(float(seconds), 3)
        if self.state["phase"] in ("training", "evaluating") and self.state["round"]:
            key = str(self.state["round"]) + ("e" if self.state["phase"] == "evaluating" else "")
            site["reply_seconds"][key] = round(float(seconds), 3)
        if message.metadata.message_type not in _STATS_TYPES and not message.has_error():
            from omopfl.federation import codec

            refusal = codec.reply_refusal(message.content)
            if refusal is None:
                self._set(name, "replied")
            elif refusal[1] in FAULT_CODES:
                self._set(name, "failed", refusal[1])
            else:  # the site's trust boundary said no, with a fixed code
                self._set(name, "refused", refusal[1])
                self.state["refused"].append({"site": name, "code": refusal[1],
                                              "phase": f"round {self.state['round']}"})
        self._write(force=True)

    @_safe
    def waiting(self, elapsed: float) -> None:
        """``elapsed`` seconds into the current exchange, some replies have not come yet."""
        slowest = float(self._exchange.get("slowest", 0.0))
        timeout = self._exchange.get("timeout")
        changed = False
        for node in sorted(self._exchange.get("nodes", ())):
            name = self._nodes.get(int(node))
            if name is None or self._site(name)["state"] != "training":
                continue
            previous = [v for k, v in self._site(name)["reply_seconds"].items() if not k.endswith("e")]
            reference = max(slowest, max(previous, default=0.0))
            late = (reference > 0 and elapsed > max(3.0, 2 * reference)) or (
                timeout is not None and elapsed > 0.5 * float(timeout))
            if late:
                changed |= self._set(name, "late", f"no reply after {elapsed:.0f} s")
        self._write(force=changed)

    # -- what the ServerApp reports -----------------------------------------------------------
    @_safe
    def stats_done(self, stats: Mapping[str, Any]) -> None:
        """The statistics phase's result (:func:`omopfl.federation.coordinator.statistics.federated_statistics`)."""
        sites = stats.get("sites", {})
        for name, node in dict(sites.get("scaler_nodes", {})).items():
            self._nodes[int(node)] = str(name)
        for name in sites.get("contributing", []):
            self._set(str(name), "connected")
        withheld = [str(n) for n in sites.get("withheld", [])]
        for name in withheld:
            self._set(name, "withheld", "fewer persons than its min_cell_count")
        self.state["withheld"] = withheld
        for entry in sites.get("failed", []):
            name, code = entry.get("site") or f"node {entry.get('node')}", str(entry.get("code", ""))
            if code in FAULT_CODES or code.startswith("flower_error_"):
                self._set(name, "failed", code)
            else:
                self._set(name, "refused", code)
                self.state["refused"].append({"site": name, "code": code, "phase": "statistics"})
        acknowledged = set(sites.get("scaler_acknowledged", []))
        for name, site in self.state["sites"].items():
            if site["state"] in ("connected", "withheld") and sites.get("scaler_nodes") is not None \
                    and name not in acknowledged and stats.get("scaler") is not None:
                self._set(name, "failed", "did not take the global scaler")
        self.state["phase"] = "training"
        self._write(force=True)

    @_safe
    def refused(self, site: str, code: str, server_round: int | None = None) -> None:
        """A site declined a message with a fixed refusal code (it takes no further part)."""
        self._set(str(site), "refused", str(code))
        self.state["refused"].append({"site": str(site), "code": str(code),
                                      "phase": "statistics" if server_round is None else f"round {server_round}"})
        self._write(force=True)

    @_safe
    def round_started(self, server_round: int) -> None:
        self.state["round"] = int(server_round)
        self.state["phase"] = "training"
        self._write(force=True)

    @_safe
    def evaluating(self) -> None:
        self.state["phase"] = "evaluating"
        self._write(force=True)

    @_safe
    def round_done(self, rows: Iterable[Mapping[str, Any]], dropped: Iterable[Mapping[str, Any]]) -> None:
        """After a round: every metrics row so far and every dropped site so far."""
        self.state["metrics"] = [dict(r) for r in rows]
        self._dropped(dropped)
        self._write(force=True)

    def _dropped(self, dropped: Iterable[Mapping[str, Any]]) -> None:
        self.state["dropped"] = [dict(d) for d in dropped]
        for entry in self.state["dropped"]:
            if self._site(str(entry["site"]))["state"] in ("refused", "failed"):
                continue  # dropped for its refusal or error: the state says why
            self._set(str(entry["site"]), "dropped", f"round {entry.get('round')}: {entry.get('reason', '')}")

    @_safe
    def finished(self, rows: Iterable[Mapping[str, Any]], dropped: Iterable[Mapping[str, Any]]) -> None:
        self.state["metrics"] = [dict(r) for r in rows]
        self._dropped(dropped)
        for name, site in self.state["sites"].items():
            if site["state"] in ("connected", "training", "replied", "late"):
                self._set(name, "done")
        self.state["phase"] = "done"
        self._write(force=True)

    @_safe
    def failed(self, message: str, dropped: Iterable[Mapping[str, Any]] | None = None) -> None:
        if dropped is not None:
            self._dropped(dropped)
        self.state["phase"] = "failed"
        self.state["message"] = str(message)[:300]
        self._write(force=True)

    del _safe


def mark_failed(run_dir: Path, message: str) -> None:
    """Set ``live.json``'s phase to ``failed`` (the ServerApp stopped with ``message``); never raises."""
    path = Path(run_dir) / LIVE_FILE
    try:
        state = json.loads(path.read_text())
        if state.get("phase") in ("done", "failed"):
            return
        state.update(phase="failed", message=str(message)[:2000], updated_at=_now())
        write_json(path, state, default=str, allow_nan=True)
    except (OSError, ValueError) as exc:
        _log.debug("omopfl live view: %s", exc)


# --------------------------------------------------------------------------------------------
# the read-only web view
# --------------------------------------------------------------------------------------------


def read_state(run_dir: Path) -> dict[str, Any]:
    """``live.json`` of a run directory (a ``starting`` placeholder before the ServerApp wrote it)."""
    try:
        return json.loads((Path(run_dir) / LIVE_FILE).read_text())
    except (OSError, ValueError):
        return {"version": 1, "phase": "starting", "round": 0, "rounds": 0, "sites": [], "metrics": [],
                "dropped": [], "withheld": [], "refused": [], "nodes_connected": 0}


def list_files(run_dir: Path) -> list[dict[str, Any]]:
    """The regular, non-hidden files directly in the run directory (what ``/files/<name>`` serves)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    files = []
    for path in sorted(run_dir.iterdir()):
        if path.name.startswith(".") or path.is_symlink() or not path.is_file():
            continue
        files.append({"name": path.name, "bytes": path.stat().st_size, "url": f"/files/{path.name}"})
    return files


_ASSETS = Path(__file__).resolve().parent
_PAGE = "run_view.html"  # the page and its script: package data beside this module
_SCRIPT = "run_view.js"


_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; "
                               "img-src 'self'; frame-ancestors 'none'",
}


class _Handler(BaseHTTPRequestHandler):
    server_version = "omopfl-view"
    sys_version = ""
    run_dir: Path
    port: int

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _send(self, status: int, body: bytes, content_type: str, head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in _HEADERS.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, data: Any, head: bool) -> None:
        self._send(200, json.dumps(data, default=str).encode(), "application/json", head)

    def _host_ok(self) -> bool:
        host = (self.headers.get("Host") or "").strip().lower()
        return host in {f"127.0.0.1:{self.port}", f"localhost:{self.port}"}

    def _get(self, head: bool) -> None:
        if not self._host_ok():
            self._send(HTTPStatus.MISDIRECTED_REQUEST, b"loopback only\n", "text/plain", head)
            return
        path = unquote(urlsplit(self.path).path)
        if path in ("/", "/index.html"):
            self._send(200, (_ASSETS / _PAGE).read_bytes(), "text/html; charset=utf-8", head)
        elif path == "/app.js":
            self._send(200, (_ASSETS / _SCRIPT).read_bytes(), "text/javascript; charset=utf-8", head)
        elif path == "/api/state":
            self._json(read_state(self.run_dir), head)
        elif path == "/api/sites":
            s = read_state(self.run_dir)
            self._json({k: s.get(k) for k in ("phase", "nodes_connected", "sites", "dropped", "withheld",
                                              "refused")}, head)
        elif path == "/api/rounds":
            s = read_state(self.run_dir)
            self._json({k: s.get(k) for k in ("phase", "round", "rounds", "metrics")}, head)
        elif path == "/api/files":
            self._json({"files": list_files(self.run_dir)}, head)
        elif path.startswith("/files/"):
            name = path[len("/files/"):]
            if name not in {f["name"] for f in list_files(self.run_dir)}:
                self._send(404, b"not found\n", "text/plain", head)
                return
            kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
            if kind.startswith("text/") or kind == "application/json":
                kind = ("text/plain" if kind == "text/html" else kind) + "; charset=utf-8"
            self._send(200, (self.run_dir / name).read_bytes(), kind, head)
        else:
            self._send(404, b"not found\n", "text/plain", head)

    def do_GET(self) -> None:
        self._get(head=False)

    def do_HEAD(self) -> None:
        self._get(head=True)

    def _refuse(self) -> None:
        self.send_response(HTTPStatus.METHOD_NOT_ALLOWED)
        self.send_header("Allow", "GET, HEAD")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse


class RunView:
    """The read-only view of a run directory on ``http://127.0.0.1:<port>/`` (``port=0``: any free port)."""

    def __init__(self, run_dir: Path, port: int = 8088) -> None:
        self.run_dir = Path(run_dir).resolve()
        handler = type("Handler", (_Handler,), {"run_dir": self.run_dir, "port": 0})
        try:
            self._server = ThreadingHTTPServer(("127.0.0.1", int(port)), handler)
        except OSError as exc:
            from omopfl.errors import ConfigError

            raise ConfigError(f"run view: cannot listen on 127.0.0.1:{port} ({exc.strerror or exc})") from None
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        handler.port = self.port
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> RunView:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="omopfl-run-view", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted (``omopfl view``)."""
        with contextlib.suppress(KeyboardInterrupt):
            self._server.serve_forever(poll_interval=0.2)
        self._server.server_close()

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> RunView:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
