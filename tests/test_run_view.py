"""The live run view: its state file, its read-only HTTP server, and a loopback deployment watched live.

* :class:`LiveState` turns what the ServerApp learns into site states (withheld, refused, failed, late,
  dropped) and never holds a per-site count;
* the HTTP server binds 127.0.0.1, refuses other Host headers and every method but GET/HEAD, and serves
  only the run directory's own regular files;
* during a real loopback deployment (``omopfl server --view`` and three ``omopfl train --site``
  SuperNodes: one withholding under its own min_cell_count, one refusing a study its data engineer did
  not approve) the JSON endpoints show the sites,
  the rounds and the metrics as they happen, and a headless Chromium (Debian's, driven by playwright)
  renders them while the run goes on; ``omopfl view`` shows the finished run.

The browser is Debian's ``chromium`` (``scripts/test.sh`` installs it when missing); without it the
browser test is skipped locally and fails in CI.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from omopfl.federation.coordinator.run_view import LIVE_FILE, LiveState, RunView, read_state
from omopfl.federation.processes import flower_env, free_port

SITE_KEYS = {"site", "state", "reason", "last_reply_seconds", "reply_seconds"}


def _get(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body = response.read()
        return json.loads(body) if response.headers.get_content_type() == "application/json" else body


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium, headless, driven by playwright (playwright's own browser download is never used)."""
    executable = _chromium()
    if executable is None:
        message = "Debian's chromium is not installed (scripts/test.sh installs it: apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=executable, headless=True,
                                      args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield chromium
        finally:
            chromium.close()


# ------------------------------------------------------------------------------- the state file
def test_live_state_names_withheld_refused_failed_late_and_dropped_sites(tmp_path: Path) -> None:
    live = LiveState(tmp_path, study="s", rounds=3, expected_sites=4, min_sites=2)
    assert read_state(tmp_path)["phase"] == "waiting"
    live.nodes_seen(4)
    stats = {"scaler": {"feature_names": ["x"]},
             "sites": {"connected": 4, "contributing": ["site_a", "site_b"], "withheld": ["site_c"],
                       "failed": [{"site": "site_d", "node": 14, "code": "study_mismatch"},
                                  {"site": None, "node": 15, "code": "flower_error_2"}],
                       "no_reply": [], "persons": {"site_a": 812, "site_b": 95},
                       "scaler_acknowledged": ["site_a", "site_b", "site_c"],
                       "scaler_nodes": {"site_a": 11, "site_b": 12, "site_c": 13}}}
    live.stats_done(stats)
    state = read_state(tmp_path)
    sites = {s["site"]: s for s in state["sites"]}
    assert {n: s["state"] for n, s in sites.items()} == {
        "site_a": "connected", "site_b": "connected", "site_c": "withheld", "site_d": "refused",
        "node 15": "failed"}
    assert sites["site_d"]["reason"] == "study_mismatch" and sites["node 15"]["reason"] == "flower_error_2"
    assert state["withheld"] == ["site_c"]
    assert state["refused"] == [{"site": "site_d", "code": "study_mismatch", "phase": "statistics"}]
    # what the view holds per site is state and timing only: no count a site released to the server
    assert all(set(s) == SITE_KEYS for s in state["sites"])
    assert "812" not in (tmp_path / LIVE_FILE).read_text()

    live.round_started(1)
    live.exchange_started(["train"], [11, 12, 13], 600.0)
    assert {s["site"]: s["state"] for s in read_state(tmp_path)["sites"]}["site_b"] == "training"
    live.waiting(10.0)  # nobody replied yet and far from the timeout: nobody is late
    assert {s["site"]: s["state"] for s in read_state(tmp_path)["sites"]}["site_b"] == "training"
    live.waiting(301.0)  # past half the round timeout
    sites = {s["site"]: s for s in read_state(tmp_path)["sites"]}
    assert sites["site_b"]["state"] == "late" and sites["site_b"]["reason"] == "no reply after 301 s"
    assert sites["site_d"]["state"] == "refused"  # a site out of the run is not put back into it
    live.refused("site_c", "not_approved", server_round=1)
    dropped = [{"site": "site_b", "round": 1, "reason": "no train reply within 600 s"}]
    live.round_done([{"round": 1, "sites": 1, "train_loss": 0.5}], dropped)
    state = read_state(tmp_path)
    sites = {s["site"]: s for s in state["sites"]}
    assert sites["site_b"]["state"] == "dropped" and "no train reply" in sites["site_b"]["reason"]
    assert sites["site_c"]["state"] == "refused" and sites["site_c"]["reason"] == "not_approved"
    assert state["metrics"] == [{"round": 1, "sites": 1, "train_loss": 0.5}] and state["dropped"] == dropped
    live.finished(state["metrics"], dropped)
    state = read_state(tmp_path)
    assert state["phase"] == "done" and {s["site"]: s["state"] for s in state["sites"]}["site_a"] == "done"


def test_live_state_never_raises(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    live = LiveState(tmp_path, study="s", rounds=1, expected_sites=1, min_sites=1)
    live.path = blocker / LIVE_FILE  # a folder that cannot exist
    live.round_started(1)
    live.stats_done({"sites": None})
    live.finished([], [])


# ------------------------------------------------------------------------------- the HTTP server
def _raw(port: int, method: str, path: str, host: str | None = None) -> tuple[int, bytes, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.putrequest(method, path, skip_host=True)
        conn.putheader("Host", host or f"127.0.0.1:{port}")
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read(), dict(response.getheaders())
    finally:
        conn.close()


def test_the_view_is_read_only_loopback_and_serves_only_the_run_directory(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.csv").write_text("round\n1\n")
    (run_dir / ".hidden").write_text("no")
    (tmp_path / "secret.txt").write_text("outside")
    (run_dir / "link.txt").symlink_to(tmp_path / "secret.txt")
    with RunView(run_dir, port=0) as view:
        assert view.url == f"http://127.0.0.1:{view.port}/"
        assert view._server.server_address[0] == "127.0.0.1"
        status, body, headers = _raw(view.port, "GET", "/")
        assert status == 200 and b"<script src=\"/app.js\">" in body
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        assert b"http://" not in body and b"https://" not in body  # no external asset: works offline
        status, script, _ = _raw(view.port, "GET", "/app.js")
        assert status == 200 and b"http" not in script.replace(b"fetch(\"/api", b"")
        assert _get(view.url + "api/state")["phase"] == "starting"  # before the ServerApp wrote live.json
        files = _get(view.url + "api/files")["files"]
        assert [f["name"] for f in files] == ["metrics.csv"]
        assert _get(view.url + "files/metrics.csv") == b"round\n1\n"
        for path in ("/files/.hidden", "/files/link.txt", "/files/../secret.txt", "/files/%2e%2e/secret.txt",
                     "/files/", "/nothing"):
            assert _raw(view.port, "GET", path)[0] == 404, path
        assert _raw(view.port, "POST", "/api/state")[0] == 405
        assert _raw(view.port, "DELETE", "/files/metrics.csv")[0] == 405
        assert _raw(view.port, "GET", "/api/state", host="evil.example:80")[0] == 421  # DNS rebinding
        assert _raw(view.port, "HEAD", "/api/state")[0] == 200
    assert (run_dir / "metrics.csv").read_text() == "round\n1\n"


def test_omopfl_view_refuses_a_missing_run_directory(tmp_path: Path) -> None:
    from conftest import run_omopfl

    assert run_omopfl(["view", str(tmp_path / "absent")]) == 2


# ------------------------------------------------------------------------------- a live deployment
def _omopfl() -> list[str]:
    script = Path(sys.executable).parent / "omopfl"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "omopfl.cli"]


class _Processes:
    """Processes started in their own sessions; stopped by PID (process group)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        with (self.logs / f"{name}.log").open("wb") as log:
            env = {**flower_env(), "FLWR_HOME": str(self.logs / f"flwr_home_{name}")}
            self.procs[name] = subprocess.Popen([*_omopfl(), *args], stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        return self.procs[name]

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
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


def _wait_for_view(url: str, proc: subprocess.Popen, started: _Processes, name: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while True:
        with contextlib.suppress(OSError):
            _get(url + "api/state", timeout=2)
            return
        assert proc.poll() is None, started.log(name)[-3000:]
        assert time.monotonic() < deadline, f"no run view within {seconds:.0f} s"
        time.sleep(0.2)


@pytest.mark.slow
def test_the_view_follows_a_loopback_deployment_live(prepared_sites_factory, browser, tmp_path: Path) -> None:
    from omopfl import policy
    from omopfl.config import load_site
    from omopfl.study import load_study

    federation = prepared_sites_factory("run_view", approve=False)
    adapter_b = federation["adapters"][1]  # site_b's own rule: more persons than it has -> it withholds
    adapter_b.write_text(re.sub(r"min_cell_count = \d+", "min_cell_count = 100000", adapter_b.read_text()))
    for adapter in federation["adapters"][:2]:  # site_c's data engineer has not approved the study
        policy.approve(load_site(adapter), load_study(federation["study"]))
    rounds = 5
    port, view_port = free_port(), free_port()
    url = f"http://127.0.0.1:{view_port}/"
    run_dir = tmp_path / "run"
    started = _Processes(tmp_path)
    snapshots: list[dict[str, Any]] = []
    rendered: dict[str, Any] = {}
    try:
        server = started.start("server", [
            "server", "--study", str(federation["study"]), "--insecure", "--host", "127.0.0.1", "--port", str(port),
            "--out", str(run_dir), "--wait-seconds", "120", "--timeout", "120", "--rounds", str(rounds),
            "--sites", "3", "--min-sites", "1", "--view", "--view-port", str(view_port)])
        _wait_for_view(url, server, started, "server")
        page = browser.new_page()
        page.goto(url)
        page.wait_for_function("() => document.body.dataset.phase !== undefined", timeout=15000)
        rendered["before"] = page.inner_text("#phase")
        for index in range(3):
            started.start(f"site_{index}", [
                "train", "--site", str(federation["adapters"][index]), "--superlink", f"127.0.0.1:{port}",
                "--insecure", "--prepared", str(federation["prepared_dir"])])
        # the endpoints are polled from a thread, so that the page checks below (which wait for the
        # browser) never make the poll miss rounds on a busy machine
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                with contextlib.suppress(OSError, ValueError):
                    sites, progress = _get(url + "api/sites"), _get(url + "api/rounds")
                    snapshots.append({"t": time.monotonic(), "phase": progress["phase"], "round": progress["round"],
                                      "metrics": len(progress["metrics"] or []),
                                      "states": {s["site"]: s["state"] for s in sites["sites"]}})
                stop.wait(0.1)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        deadline = time.monotonic() + 400
        try:
            while server.poll() is None:
                assert time.monotonic() < deadline, started.log("server")[-4000:]
                latest = snapshots[-1]["metrics"] if snapshots else 0
                if "mid" not in rendered and 0 < latest < rounds - 2:
                    # the page, left open since before the sites connected, shows the rounds as they come
                    count = latest
                    page.wait_for_selector(f'#metrics tr[data-round="{count}"]', timeout=10000)
                    page.wait_for_function(f"() => document.querySelectorAll('#plot circle.loss').length > {count}",
                                           timeout=20000)
                    rendered["mid"] = {"rows": page.locator("#metrics tbody tr").count(),
                                       "round": page.inner_text("#round"),
                                       "sites": {page.locator("#sites tbody tr").nth(i).get_attribute("data-site"):
                                                 page.locator("#sites tbody tr").nth(i).get_attribute("data-state")
                                                 for i in range(page.locator("#sites tbody tr").count())}}
                time.sleep(0.05)
        finally:
            stop.set()
            poller.join(timeout=10)
        assert server.returncode == 0, started.log("server")[-4000:]
    finally:
        started.stop_all()

    # the endpoints showed the run as it happened: sites before rounds, then rounds one after another
    assert snapshots, "the view never answered during the run"
    assert snapshots[0]["metrics"] == 0 and snapshots[0]["phase"] in ("starting", "waiting", "statistics")
    lengths = [s["metrics"] for s in snapshots]
    assert lengths == sorted(lengths) and len({n for n in lengths if 0 < n < rounds}) >= 2, lengths
    during = [s for s in snapshots if 0 < s["metrics"] < rounds]
    assert all(s["states"]["site_b"] == "withheld" and s["states"]["site_c"] == "refused" for s in during)
    assert any(s["states"].get("site_a") in ("training", "replied", "late") for s in during)
    assert any(s["phase"] == "training" and s["round"] >= 2 for s in snapshots)
    # the page rendered the live state
    assert rendered["before"] in ("starting", "waiting", "statistics")
    assert rendered["mid"]["rows"] >= 1 and rendered["mid"]["sites"]["site_b"] == "withheld"
    assert rendered["mid"]["sites"]["site_c"] == "refused"
    assert rendered["mid"]["sites"]["site_a"] in ("training", "replied", "late", "connected")

    # the state file agrees with the run directory; per-site timings for every round; nothing else per site
    state = json.loads((run_dir / LIVE_FILE).read_text())
    assert state["phase"] == "done" and state["round"] == rounds and state["withheld"] == ["site_b"]
    assert state["refused"] == [{"site": "site_c", "code": "study_not_approved", "phase": "statistics"}]
    assert state["metrics"] == json.loads((run_dir / "metrics.json").read_text())["rounds"]
    sites = {s["site"]: s for s in state["sites"]}
    assert set(sites) == {"site_a", "site_b", "site_c"} and all(set(s) == SITE_KEYS for s in sites.values())
    assert {str(r) for r in range(1, rounds + 1)} <= set(sites["site_a"]["reply_seconds"])
    assert LIVE_FILE not in json.loads((run_dir / "manifest.json").read_text())["files"]

    # `omopfl view` shows the finished run: every round plotted, the withheld and refused sites, the files
    viewer = started.start("view", ["view", str(run_dir), "--port", str(view_port)])
    try:
        _wait_for_view(url, viewer, started, "view", seconds=60)
        page = browser.new_page()
        page.goto(url)
        page.wait_for_function("() => document.body.dataset.phase === 'done'", timeout=15000)
        assert page.locator("#plot circle.loss").count() == rounds
        evaluated = sum(r.get("eval_auc") is not None for r in state["metrics"])  # some withheld (omopfl.release)
        assert evaluated >= 1 and page.locator("#plot circle.auc").count() == evaluated
        faults = page.inner_text("#faults")
        assert "site_b withheld its statistics" in faults and "site_c refused (study_not_approved)" in faults
        links = {a.inner_text(): a.get_attribute("href") for a in page.locator("#files a").all()}
        assert {"model.npz", "metrics.csv", "metrics.png", "report.md", "manifest.json"} <= set(links)
        assert _get(url.rstrip("/") + links["metrics.csv"]) == (run_dir / "metrics.csv").read_bytes()
        page.screenshot(path=str(tmp_path / "run_view.png"), full_page=True)
    finally:
        started.stop_all()
