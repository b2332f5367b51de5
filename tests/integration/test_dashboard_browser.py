"""The dashboard of a running server, rendered by a real headless Chromium (its JavaScript ran:
the assertions read the rendered DOM's text, and a screenshot of the window), before and after
a round with updates."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from hfedmoe.config import ModelConfig
from hfedmoe.models import build_model
from hfedmoe.names import ExpertId
from hfedmoe.transport.broker import free_port
from hfedmoe.wire import encode
from tests.broker_required import need_chromium
from tests.integration.conftest import SMALL, FakeDevice, merge, metrics, spawn, stop, wait_for
from tests.integration.test_server_rounds import make_update, round_of

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
        "track", "wbr"}


class Node:
    def __init__(self, tag: str, attrs: dict[str, str]) -> None:
        self.tag, self.attrs, self.children = tag, attrs, []

    def text(self) -> str:
        return " ".join(" ".join(c.text() if isinstance(c, Node) else c
                                 for c in self.children).split())

    def find(self, pred) -> list[Node]:
        out = [self] if pred(self) else []
        for c in self.children:
            if isinstance(c, Node):
                out += c.find(pred)
        return out

    def by_id(self, ident: str) -> Node:
        (node,) = self.find(lambda n: n.attrs.get("id") == ident)
        return node


class _Tree(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.root = Node("#root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data):
        if self.stack[-1].tag not in ("script", "style"):
            self.stack[-1].children.append(data)


def parse(html: str) -> Node:
    tree = _Tree()
    tree.feed(html)
    return tree.root


def chromium(binary: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu",
                           "--no-first-run", "--disable-dev-shm-usage", "--hide-scrollbars",
                           f"--user-data-dir={tmp_path / 'chromium-profile'}", *args],
                          capture_output=True, text=True, timeout=90)


def api_state(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url + "api/state", timeout=5) as resp:
            return json.loads(resp.read())
    except OSError:
        return None


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def base_model():
    """The model the server builds (same config and seed): the shapes of hand-made updates."""
    return build_model(ModelConfig(num_experts=2, top_k=1, max_length=32), "classification", 10)


def send_updates(devices: list[FakeDevice], model, run_id: str,
                 trained: dict[str, tuple[ExpertId, ...]]) -> None:
    """Each device in ``trained`` sends round 0 an update of those experts; all accepted."""
    base = round_of(devices[0], 0)["model"]["state_hash"]
    for d in devices:
        if d.device_id in trained:
            sha = d.send(encode(make_update(model, run_id, 0, d.device_id, base,
                                            experts=trained[d.device_id]), 0.01))
            d.wait(lambda d=d, sha=sha: d.ack_for(sha) is not None, 60, "the ack")
            assert d.ack_for(sha)["status"] == "accepted", d.ack_for(sha)


def check_experts_trained(dom: Node, trained: dict[str, tuple[ExpertId, ...]]) -> None:
    """The "Experts trained" panel shows round 0's grid: a row per device that sent an
    update, a column per expert any of them trained (grouped by layer), a cell filled for each
    expert a device trained."""
    grid = dom.by_id("sel-grid")
    rows = grid.find(lambda x: x.tag == "tr" and x.find(lambda y: y.tag == "td"))
    assert [r.attrs.get("data-device") for r in rows] == sorted(trained)
    filled = {r.attrs["data-device"]: len(r.find(lambda x: x.tag == "td" and "on" in x.attrs.get(
        "class", "").split())) for r in rows}
    assert filled == {d: len(e) for d, e in trained.items()}, filled
    experts = {e for es in trained.values() for e in es}
    assert all(len(r.find(lambda x: x.tag == "td")) == len(experts) for r in rows)
    layers = [th.text() for th in grid.find(lambda x: x.tag == "th" and x.text().startswith(
        "layer"))]
    assert layers == [f"layer {i}" for i in sorted({e.layer_idx for e in experts})]
    measures = dom.by_id("sel-kv").text()  # one pair of devices: {0:0} and {0:0, 1:1}
    for part in ("round 1", "devices 2", "Jaccard 0.500", "overlap coef. 1.000",
                 "experts trained 2", "coverage 16.7 %"):  # 2 of 12 experts
        assert part in measures, measures


@pytest.mark.broker
def test_dashboard_of_a_running_round_in_chromium(tmp_path, mosquitto, monkeypatch):
    binary = need_chromium()  # skips, or fails under HFEDMOE_REQUIRE_BROWSER/BROKER=1
    monkeypatch.delenv("HFEDMOE_DASHBOARD_TOKEN", raising=False)  # loopback, no token
    run_id, port, n = "dash", free_port(), 3
    # round 0 closes once two updates are in; round 1 is open while the page is checked again
    cfg = merge(SMALL, {"run_id": run_id, "run_dir": str(tmp_path / "run"),
                        "max_eval_examples": 16, "eval_batch_size": 16, "dashboard_port": port,
                        "transport": {"url": mosquitto, "keepalive": 5},
                        "rounds": {"rounds": 2, "min_devices": n, "min_updates": 2,
                                   "deadline_s": 300.0, "registration_timeout_s": 60.0}})
    server = spawn("server", cfg, tmp_path / "server.toml")
    building = ThreadPoolExecutor(1)
    model = building.submit(base_model)  # while the server starts
    devices = [FakeDevice(mosquitto, run_id, f"dev-{i}") for i in range(n)]
    url = f"http://127.0.0.1:{port}/"
    try:
        for d in devices:
            d.register()
        # the agents' eligibility reports (status messages; not about a round, so nobody is
        # skipped): their readings replace the registration's on the dashboard
        for d, body in ((devices[0], {"eligible": True, "reasons": [], "conditions": {
                "battery_pct": 80, "charging": True, "temperature_c": 31.5}}),
                        (devices[2], {"eligible": False, "reasons": [
                            "battery 8% < 30% and not charging"], "conditions": {
                            "battery_pct": 8, "charging": False, "temperature_c": 30.0}})):
            d.t.publish(d.topics.status(d.device_id), json.dumps(
                {"state": "online", "round": None, **body}).encode(), retain=True)
        wait_for(lambda: (s := api_state(url)) is not None and s["round"] is not None
                 and sum(d["eligible"] is not None for d in s["devices"]) == 2,
                 90, "round 0 and the eligibility reports on the dashboard", [server])

        out = chromium(binary, tmp_path, "--virtual-time-budget=5000", "--dump-dom", url)
        assert out.returncode == 0, out.stderr[-2000:]
        dom = parse(out.stdout)
        rows = [[td.text() for td in tr.find(lambda x: x.tag == "td")]
                for tr in dom.by_id("fleet").find(lambda x: x.tag == "tr" and x.find(
                    lambda y: y.tag == "td"))]
        header = [th.text() for th in dom.by_id("fleet").find(lambda x: x.tag == "th")]
        table = {r[0]: dict(zip(header, r, strict=True)) for r in rows}
        assert sorted(table) == [f"dev-{i}" for i in range(n)], rows
        for row in table.values():
            assert row["status"] == "online" and row["this round"] == "waiting", row
            assert row["budget (limited by)"] == "2"
        assert (table["dev-0"]["battery"], table["dev-0"]["thermal"],
                table["dev-0"]["eligibility"]) == ("80 % (charging)", "31.5 °C", "eligible")
        assert (table["dev-2"]["battery"], table["dev-2"]["eligibility"]) == (
            "8 %", "skip: battery 8% < 30% and not charging")
        assert table["dev-1"]["battery"] == "–" and table["dev-1"]["eligibility"] == "–"
        # round_idx 0 is round 1, as the console says
        assert dom.by_id("round-title").text() == "round 1 of 2", dom.by_id("round-title").text()
        progress = dom.by_id("round-kv").text()
        assert f"answered 0/{n}" in progress and "deadline in" in progress, progress
        assert dom.by_id("phase").text().startswith("round open")
        assert dom.by_id("conn").text() == "live"
        fleet = dom.by_id("fleet-kv").text()
        assert f"devices {n}" in fleet and f"online {n}" in fleet, fleet
        # the initial evaluation is already on the charts' table
        assert "initial" in dom.by_id("rounds").text()
        assert "no round closed yet" in dom.by_id("sel-note").text()

        shot = tmp_path / "dashboard.png"
        out = chromium(binary, tmp_path, "--virtual-time-budget=5000", "--window-size=1280,900",
                       f"--screenshot={shot}", url)
        assert out.returncode == 0 and shot.exists(), out.stderr[-2000:]
        data = shot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
        assert struct.unpack(">II", data[16:24]) == (1280, 900)
        import matplotlib.image

        pixels = matplotlib.image.imread(shot)
        assert pixels.shape[:2] == (900, 1280)
        colours = np.unique((pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
        assert len(colours) > 50, len(colours)  # text, table, header bar: not a blank page

        with urllib.request.urlopen(url + "report", timeout=60) as resp:  # written on demand
            assert resp.status == 200 and b"HFedMoE run" in resp.read()

        # two devices train different experts in round 0: the page shows who trained what
        trained = {"dev-0": (ExpertId(0, 0),), "dev-1": (ExpertId(0, 0), ExpertId(1, 1))}
        send_updates(devices, model.result(timeout=120), run_id, trained)
        wait_for(lambda: (s := api_state(url)) is not None and s["selection"]["round"] == 0,
                 90, "round 0's selection on the dashboard", [server])
        out = chromium(binary, tmp_path, "--virtual-time-budget=3000", "--dump-dom", url)
        assert out.returncode == 0, out.stderr[-2000:]
        check_experts_trained(parse(out.stdout), trained)

        for d in devices:  # everyone leaves: round 1 closes without updates, the run ends
            d.t.publish(d.topics.status(d.device_id), b'{"state": "offline"}', retain=True)
        wait_for(lambda: server.poll() is not None, 90, "the server to finish")
        assert server.returncode == 0
    finally:
        building.shutdown()
        stop(server)
        for d in devices:
            d.close()
    assert not listening(port)  # the dashboard stopped with the server
    log = (tmp_path / "server.log").read_text()
    assert f"dashboard: {url}" in log
    rows = metrics(tmp_path / "run")
    assert [r["phase"] for r in rows] == ["initial", "round", "round"]
    assert rows[1]["selection"]["union"] == 2 and sorted(rows[1]["held"]) == sorted(trained)


def column(table: Node, header: str) -> list[str]:
    """The texts of ``table``'s column ``header``, top to bottom."""
    heads = [th.text() for th in table.find(lambda x: x.tag == "th")]
    rows = [[td.text() for td in tr.find(lambda x: x.tag == "td")]
            for tr in table.find(lambda x: x.tag == "tr" and x.find(lambda y: y.tag == "td"))]
    return [r[heads.index(header)] for r in rows]


def test_dashboard_numbers_rounds_like_the_console(tmp_path, monkeypatch):
    """A run directory with the initial evaluation and rounds 0 and 1, and round_idx 2 open:
    the page says initial, 1, 2 in its table and round 3 over it (server.rounds.round_label)."""
    from types import SimpleNamespace

    from server.config import DASHBOARD_TOKEN_ENV, RoundConfig, ServerConfig
    from server.dashboard import Dashboard
    from server.store import Store
    from tests.server.run_dir import write_run

    binary = need_chromium()
    monkeypatch.delenv(DASHBOARD_TOKEN_ENV, raising=False)
    store = Store(write_run(tmp_path / "run"))
    open_round = SimpleNamespace(round_idx=2, participants=["phone", "laptop"], accepted={},
                                 refused={}, expected=2, rejected=0, late=0, deadline=None,
                                 started=1.0, skipped={})
    c = SimpleNamespace(cfg=ServerConfig(run_id="two", run_dir=str(tmp_path / "run"),
                                         rounds=RoundConfig(rounds=3)),
                        store=store, round=open_round, next_round=2, clock=lambda: 2.0,
                        strategy=SimpleNamespace(name="hfedmoe"), hooks=[])
    dashboard = Dashboard(c, port=0).start()
    try:
        out = chromium(binary, tmp_path, "--virtual-time-budget=3000", "--dump-dom",
                       dashboard.url)
    finally:
        dashboard.close()
        store.close()
    assert out.returncode == 0, out.stderr[-2000:]
    dom = parse(out.stdout)
    assert column(dom.by_id("rounds"), "round") == ["2", "1", "initial"]  # newest first
    assert dom.by_id("round-title").text() == "round 3 of 3"
    last = dict(zip(column(dom.by_id("fleet"), "device"),
                    column(dom.by_id("fleet"), "last round"), strict=True))
    assert last == {"laptop": "1", "phone": "2"}  # round_idx 0 and 1
