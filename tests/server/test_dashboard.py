"""The live dashboard over the in-memory transport: the state a running coordinator serves,
and the token rules (loopback open, elsewhere a token, compared on every request)."""

from __future__ import annotations

import fnmatch
import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest

import server.dashboard
from hfedmoe.errors import ConfigError
from hfedmoe.models.hf import build_hf_model
from hfedmoe.transport.broker import free_port
from hfedmoe.transport.memory import MemoryHub
from hfedmoe.transport.topics import Topics
from server.config import DASHBOARD_TOKEN_ENV, RoundConfig, ServerConfig, is_loopback
from server.coordinator import Coordinator
from server.dashboard import Dashboard
from tests.server.run_dir import write_run


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_listening(port: int, timeout: float = 30.0) -> None:
    """The coordinator starts its dashboard on its own thread, once it subscribed."""
    end = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert time.monotonic() < end, f"nothing listens on {port}"
        time.sleep(0.05)


def state(port: int) -> dict:
    code, body = get(f"http://127.0.0.1:{port}/api/state")
    assert code == 200
    return json.loads(body)


def wait_state(port: int, pred, what: str, timeout: float = 30.0) -> dict:
    end = time.monotonic() + timeout
    while True:
        s = state(port)
        if pred(s):
            return s
        assert time.monotonic() < end, f"timed out waiting for {what}: {s}"
        time.sleep(0.1)


def test_state_of_a_running_round(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(DASHBOARD_TOKEN_ENV, raising=False)  # loopback without a token: open
    caplog.set_level("INFO", logger="hfedmoe.server")
    model = build_hf_model("qwen3-moe", "classification", num_labels=3)
    port = free_port()
    cfg = ServerConfig(run_id="dash", run_dir=str(tmp_path), dashboard_port=port,
                       rounds=RoundConfig(rounds=1, deadline_s=60, min_devices=3,
                                          registration_timeout_s=30))
    hub = MemoryHub()
    coordinator = Coordinator(cfg, hub.connect("server"), model, None)
    # what an accepted update of an earlier round left (as the coordinator records it)
    coordinator.store.record_participation(
        0, "jetson", 2, 2, -1, {"bytes": 4096, "steps": 5, "limit": "time",
                                "reason": "12 s window", "latency": {
                                    "step": {"median": 0.0125, "p90": 0.02, "total": 0.07}}})
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(rows=coordinator.run()), daemon=True)
    thread.start()
    topics = Topics("dash")
    reports = {
        "phone": {"emulated": True, "source": "phone-midrange-6gb", "battery_percent": 71.0,
                  "battery_plugged": False, "temperature_c": 38.5,
                  "budget": {"limit": "memory", "reason": "6 GB"}},
        "jetson": {"platform": "linux-aarch64", "board": "NVIDIA Jetson Orin Nano",
                   "temperature_c": 51.0},
        "laptop": {"platform": "linux-x86_64", "cpu_model": "Ryzen 7"},
    }
    devices = {d: hub.connect(d) for d in reports}
    acks: dict[str, list] = {d: [] for d in devices}
    try:
        # the page is up before any device
        wait_listening(port)
        code, page = get(f"http://127.0.0.1:{port}/")
        assert code == 200 and b'<script src="dashboard.js"' in page
        assert b'<link rel="stylesheet" href="dashboard.css">' in page
        script = get(f"http://127.0.0.1:{port}/dashboard.js")[1]
        assert b"api/state" in script
        for body in (page, script):  # no CDN
            assert b"http://" not in body.replace(b"http://www.w3.org/2000/svg", b"")
        s = wait_state(port, lambda s: s["phase"] == "waiting for devices", "the first state")
        assert s["devices"] == [] and s["round"] is None
        # who takes in the updates: the coordinator (no ingest workers, MQTT 3.1.1)
        mode = "ingestion: coordinator only (transport.protocol 3.1.1: no shared subscriptions)"
        assert s["ingestion"] == {"mode": "coordinator", "workers": 0, "protocol": "3.1.1",
                                  "text": mode}
        assert any(m.startswith("ready: run dash") and m.endswith(mode) for m in caplog.messages)
        for budget, (d, t) in enumerate(devices.items(), start=1):
            t.subscribe(topics.ack(d), lambda m, d=d: acks[d].append(json.loads(m.payload)))
            t.publish(topics.status(d), b'{"state": "online"}', retain=True)
            t.publish(topics.register(d), json.dumps({"budget": budget,
                                                      "report": reports[d]}).encode())
        # the coordinator's eligibility reports (filled from status messages) win over the
        # registration's battery and temperature
        coordinator.eligibility["phone"] = {
            "eligible": False, "reasons": ["battery 12% < 20% and not charging"],
            "conditions": {"battery_pct": 12.0, "charging": False, "temperature_c": 40.0},
            "round": None, "at": 0.0}
        s = wait_state(port, lambda s: s["round"] is not None, "round 0 to open")
        by_id = {d["id"]: d for d in s["devices"]}
        assert sorted(by_id) == ["jetson", "laptop", "phone"]
        assert s["round"]["index"] == 0 and s["round"]["participants"] == 3
        assert s["round"]["answered"] == 0 and s["counts"]["online"] == 3
        phone, jetson, laptop = by_id["phone"], by_id["jetson"], by_id["laptop"]
        assert phone["class"] == "phone-midrange-6gb" and phone["emulated"]
        assert (phone["battery_pct"], phone["charging"], phone["temperature_c"]) == (12.0, False,
                                                                                     40.0)
        assert phone["eligible"] is False and "battery" in phone["reasons"][0]
        assert phone["budget"] == 1 and phone["limit"] == "memory"
        assert jetson["class"] == "NVIDIA Jetson Orin Nano" and jetson["temperature_c"] == 51.0
        assert (jetson["last_round"], jetson["experts_sent"], jetson["bytes"], jetson["step_ms"],
                jetson["limit"], jetson["reason"]) == (0, 2, 4096, 12.5, "time", "12 s window")
        assert laptop["class"] == "linux-x86_64 Ryzen 7" and laptop["eligible"] is None
        assert {d["this_round"] for d in s["devices"]} == {"waiting"}
        # every participant goes offline: the round closes without updates
        for d, t in devices.items():
            t.publish(topics.status(d), b'{"state": "offline"}', retain=True)
        thread.join(60)
        assert not thread.is_alive()
        s = state(port)  # still served until close()
        assert s["phase"] == "finished" and s["round"] is None
        assert {d["status"] for d in s["devices"]} == {"offline"}
        assert [h["phase"] for h in s["history"]] == ["initial", "round"]
        assert s["history"][-1]["participants"] == 3 and s["history"][-1]["accepted"] == 0
        code, _ = get(f"http://127.0.0.1:{port}/nothing")
        assert code == 404
    finally:
        for d, t in devices.items():  # (again, should an assertion have failed before)
            t.publish(topics.status(d), b'{"state": "offline"}', retain=True)
        thread.join(60)
        coordinator.close()
    assert coordinator.dashboard is not None and coordinator.dashboard._httpd is None
    with pytest.raises(OSError):  # closed: nothing listens any more
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/state", timeout=2)


def test_token_rules(tmp_path, monkeypatch):
    monkeypatch.delenv(DASHBOARD_TOKEN_ENV, raising=False)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    ServerConfig(dashboard_port=8765)  # loopback: open
    ServerConfig(dashboard_port=0, dashboard_host="0.0.0.0")  # off: nothing to protect
    with pytest.raises(ConfigError, match="token"):
        ServerConfig(dashboard_port=8765, dashboard_host="0.0.0.0")
    assert ServerConfig(dashboard_port=8765, dashboard_host="0.0.0.0",
                        dashboard_token="s3cret").dashboard_secret == "s3cret"
    monkeypatch.setenv(DASHBOARD_TOKEN_ENV, "from-env")
    cfg = ServerConfig(dashboard_port=8765, dashboard_host="0.0.0.0")
    assert cfg.dashboard_secret == "from-env"
    from server.coordinator import _jsonable

    assert "dashboard_token" not in _jsonable(ServerConfig(dashboard_token="x"))


def test_token_required_on_every_request(tmp_path, monkeypatch):
    model = build_hf_model("qwen3-moe", "classification", num_labels=3)
    monkeypatch.setenv(DASHBOARD_TOKEN_ENV, "tok-123")
    port = free_port()
    cfg = ServerConfig(run_id="tok", run_dir=str(tmp_path), dashboard_port=port)
    coordinator = Coordinator(cfg, MemoryHub().connect("server"), model, None)
    coordinator.start()
    try:
        base = f"http://127.0.0.1:{port}"
        for path in ("/", "/index.html", "/api/state", "/report", "/nothing"):
            assert get(base + path)[0] == 401
            assert get(base + path + "?token=wrong")[0] == 401
            assert get(base + path, {"Authorization": "Bearer wrong"})[0] == 401
        assert get(base + "/api/state?token=tok-123")[0] == 200
        code, body = get(base + "/api/state", {"Authorization": "Bearer tok-123"})
        assert code == 200 and json.loads(body)["run_id"] == "tok"
        code, page = get(base + "/?token=tok-123")
        assert code == 200 and b"tok-123" not in page  # the page reads it from its own URL
        assert get(base + "/report?token=tok-123")[0] == 404  # no evaluation yet
        # the page's stylesheet and script (package files, no run data) need no token: a
        # browser cannot add one to <link> and <script> requests
        assert get(base + "/dashboard.css")[0] == get(base + "/dashboard.js")[0] == 200
    finally:
        coordinator.close()


def test_busy_port_is_a_config_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cfg = ServerConfig(run_id="busy", run_dir=str(tmp_path), dashboard_port=port)

        class Fake:
            pass

        c = Fake()
        c.cfg = cfg
        with pytest.raises(ConfigError, match="cannot listen"):
            Dashboard(c).start()


def test_demo_passes_its_dashboard_port_to_the_server(tmp_path, monkeypatch):
    import argparse

    from hfedmoe.config import load_config
    from lab.launch import write_configs

    monkeypatch.delenv(DASHBOARD_TOKEN_ENV, raising=False)
    args = argparse.Namespace(strategy="hfedmoe", rounds=1, deadline=60.0, devices=2,
                              overrides=[], dashboard_port=8765)
    path, _ = write_configs(tmp_path, "mqtt://127.0.0.1:1883", args, "demo-1")
    cfg = load_config(ServerConfig, path)
    assert (cfg.dashboard_port, cfg.dashboard_host, cfg.dashboard_secret) == (8765, "127.0.0.1",
                                                                              "")
    args.dashboard_port = 0
    path, _ = write_configs(tmp_path, "mqtt://127.0.0.1:1883", args, "demo-1")
    assert load_config(ServerConfig, path).dashboard_port == 0


def test_a_failing_snapshot_does_not_stop_the_round(tmp_path, caplog):
    from server.store import Store

    store = Store(tmp_path)
    store.upsert_device("a", {"battery_percent": "full?", "emulated": True}, 2)
    c = SimpleNamespace(cfg=ServerConfig(run_dir=str(tmp_path)), store=store, round=None,
                        next_round=0, clock=lambda: 1.0, strategy=SimpleNamespace(name="x"),
                        hooks=[])
    d = Dashboard(c, port=0)
    d.hook("start")
    row = json.loads(d.state_bytes())["devices"][0]
    assert row["battery_pct"] is None and row["class"] is None  # odd values: shown as unknown
    c.clock = lambda: 1 / 0  # a bug while building: logged once, the coordinator goes on
    d.hook("open")
    d.hook("close")
    assert json.loads(d.state_bytes())["now"] == 1.0  # the last good snapshot is served
    assert sum("snapshot failed" in r.message for r in caplog.records) == 1
    store.close()


PACKAGE = Path(server.dashboard.__file__).parent


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A dashboard over a finished two-round run directory, serving; yields its base URL."""
    from server.store import Store

    monkeypatch.delenv(DASHBOARD_TOKEN_ENV, raising=False)
    write_run(tmp_path)
    store = Store(tmp_path)
    c = SimpleNamespace(cfg=ServerConfig(run_id="two", run_dir=str(tmp_path),
                                         rounds=RoundConfig(rounds=2)),
                        store=store, round=None, next_round=2, clock=lambda: 1.0,
                        strategy=SimpleNamespace(name="hfedmoe"), hooks=[])
    d = Dashboard(c, port=0).start()
    try:
        yield d.url.rstrip("/")
    finally:
        d.close()
        store.close()


def raw_get(url: str, path: str) -> tuple[int, bytes, str]:
    """GET ``path`` exactly as written (no client-side normalisation of ``..`` or ``%2e``)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.getheader("Content-Type", "")
    finally:
        conn.close()


def test_the_page_is_the_packages_files(served):
    for path, name, ctype in (("/", "index.html", "text/html; charset=utf-8"),
                              ("/index.html", "index.html", "text/html; charset=utf-8"),
                              ("/dashboard.css", "dashboard.css", "text/css; charset=utf-8"),
                              ("/dashboard.js", "dashboard.js",
                               "text/javascript; charset=utf-8")):
        code, body, got = raw_get(served, path)
        assert (code, got) == (200, ctype), path
        assert body == (PACKAGE / "static" / name).read_bytes(), path
    # and it loads exactly those: no inline style or script (the page's CSP forbids them)
    page = (PACKAGE / "static" / "index.html").read_text()
    assert "style=" not in page and "<style" not in page and "<script>" not in page


@pytest.mark.parametrize("path", [
    "/nothing", "/static/dashboard.css", "/app.py", "/__init__.py", "/handler.py",
    "/templates/report.html", "/report.html", "/../app.py", "/static/../app.py",
    "/%2e%2e/app.py", "/..%2fapp.py", "/dashboard.css/../app.py", "//etc/passwd",
    "/metrics.jsonl", "/run.db", "/index.html/", "/DASHBOARD.JS"])
def test_unknown_paths_are_404(served, path):
    code, body, _ = raw_get(served, path)
    assert code == 404 and body == b"not found\n", path


def test_an_installed_kit_ships_the_page_files():
    """Every page file matches a pattern of the server's package data (pyproject), so a
    non-editable install carries them."""
    from hfedmoe.config import tomllib

    root = PACKAGE.parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["server"]
    files = [p.relative_to(root / "server") for p in
             (*PACKAGE.glob("static/*"), *PACKAGE.glob("templates/*"))]
    assert {"index.html", "dashboard.css", "dashboard.js", "report.html"} <= {
        f.name for f in files}
    for f in files:
        assert any(fnmatch.fnmatch(f.as_posix(), p) for p in patterns), f


def host_get(url: str, host: str | None) -> int:
    """GET /api/state with ``Host: host`` (None: no Host header at all)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.putrequest("GET", "/api/state", skip_host=True)
        if host is not None:
            conn.putheader("Host", host)
        conn.endheaders()
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


@pytest.mark.parametrize("host, code", [
    ("evil.example", 421), ("evil.example:8080", 421), ("localhost.evil.example", 421),
    ("127.0.0.1.nip.io", 421), (None, 421), ("a b", 421),
    ("127.0.0.1", 200), ("localhost", 200), ("LOCALHOST.", 200), ("[::1]", 200),
    ("10.1.2.3:99", 200),  # an IP literal is the address the browser connected to
])
def test_a_tokenless_dashboard_answers_only_to_its_own_names(served, host, code):
    port = urlsplit(served).port
    name = f"{host}:{port}" if host in ("127.0.0.1", "localhost") else host
    assert host_get(served, name) == code


def test_configured_names_are_allowed(tmp_path, monkeypatch):
    from server.store import Store

    monkeypatch.delenv(DASHBOARD_TOKEN_ENV, raising=False)
    write_run(tmp_path)
    store = Store(tmp_path)
    c = SimpleNamespace(cfg=ServerConfig(run_id="two", run_dir=str(tmp_path),
                                         rounds=RoundConfig(rounds=2),
                                         dashboard_hostnames=("fl.lab.example",)),
                        store=store, round=None, next_round=2, clock=lambda: 1.0,
                        strategy=SimpleNamespace(name="hfedmoe"), hooks=[])
    d = Dashboard(c, port=0).start()
    try:
        assert host_get(d.url, "fl.lab.example") == 200
        assert host_get(d.url, "Fl.Lab.Example:443") == 200
        assert host_get(d.url, "other.lab.example") == 421
    finally:
        d.close()
        store.close()
