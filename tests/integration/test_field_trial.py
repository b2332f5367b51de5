"""A field trial's eligibility and latency, end to end over a real Mosquitto: five agents
with emulated readings (battery, charging, temperature, metered network). Three sit the round
out before joining, each with its reason. Two start training and their batteries drop
mid-round (their readings are played in order: fine when they join, 5% at the next check):
"ok" stops and sends what it trained (the run's ``on_break = "send"``), "dropper" (whose own
config says ``on_break = "drop"``) sends nothing and sits the round out. A sixth device
registers and never answers, so the round stays open until its deadline while the live
dashboard is read. The server records every skip with its reasons, the dashboard and the report
show them, and the report's latency table and latency.csv hold the step timings the training
device sent with its update."""

from __future__ import annotations

import csv
import json
import sqlite3

import pytest

from hfedmoe.transport.broker import free_port
from tests.broker_required import need_chromium
from tests.integration.conftest import (
    SMALL,
    FakeDevice,
    merge,
    metrics,
    spawn,
    stop,
    wait_for,
)
from tests.integration.test_dashboard_browser import api_state, chromium, parse

pytestmark = [pytest.mark.broker, pytest.mark.slow]

DRAINED = {"battery_pct": 5, "charging": False, "temperature_c": 31.0, "metered": False}
READINGS = {
    "ok": [{"battery_pct": 80, "charging": False, "temperature_c": 31.0, "metered": False},
           DRAINED],
    "low": {"battery_pct": 8, "charging": False, "temperature_c": 30.0, "metered": False},
    "hot": {"battery_pct": 90, "charging": True, "temperature_c": 61.5, "metered": False},
    "metered": {"battery_pct": 70, "charging": False, "temperature_c": 30.0, "metered": True},
    "dropper": [{"battery_pct": 60, "charging": False, "temperature_c": 30.0,
                 "metered": False}, DRAINED],
}


def test_ineligible_devices_sit_out_with_reasons_and_latency_is_reported(tmp_path, mosquitto):
    browser = need_chromium()  # skips, or fails where CI requires the browser
    run_id = "trial"
    run_dir = tmp_path / "run"
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    server = spawn("server", merge(SMALL, {
        "run_id": run_id, "run_dir": str(run_dir), "max_eval_examples": 16,
        "dashboard_port": port,
        "eval_batch_size": 16, "transport": {"url": mosquitto, "keepalive": 5},
        "eligibility": {"min_battery_pct": 20, "max_temperature_c": 45, "allow_metered": False,
                        "on_break": "send", "check_every_s": 0.01},
        "rounds": {"rounds": 1, "min_devices": 6, "deadline_s": 25.0,
                   "registration_timeout_s": 180.0}}), tmp_path / "server.toml")
    agents = {}
    for i, (name, readings) in enumerate(READINGS.items()):
        (tmp_path / f"{name}.json").write_text(json.dumps(readings))
        agents[name] = spawn("agent", merge(SMALL, {
            "device_id": name, "run_id": run_id, "work_dir": str(tmp_path / name),
            "shard": i, "num_shards": 5, "emulate": "phone-midrange-6gb",
            "conditions_file": str(tmp_path / f"{name}.json"), "matmul_seconds": 0.2,
            **({"eligibility": {"on_break": "drop"}} if name == "dropper" else {}),
            "upload_margin_s": 5.0, "train": {"max_steps": 400, "local_epochs": 50},
            "transport": {"url": mosquitto, "keepalive": 5}}), tmp_path / f"{name}.toml")
    idle = FakeDevice(mosquitto, run_id, "idle")  # registered, online, never answers
    try:
        idle.register()
        # the live dashboard shows who sits out and why, while the round is open
        wait_for(lambda: (st := api_state(url)) is not None and st["round"] is not None
                 and {"low", "hot", "metered"} <= set(st["round"]["skipped"]), 60,
                 "the skips on the dashboard", [server])
        state = {d["id"]: d for d in api_state(url)["devices"]}
        assert state["low"]["eligible"] is False
        assert state["low"]["reasons"] == ["battery 8% < 20% and not charging"]
        assert state["metered"]["reasons"] == ["on a metered network"]
        dom = chromium(browser, tmp_path, "--virtual-time-budget=4000", "--dump-dom", url)
        rows = {tr.find(lambda n: n.tag == "td")[0].text(): tr.text()
                for tr in parse(dom.stdout).by_id("fleet").find(lambda n: n.tag == "tr")
                if tr.find(lambda n: n.tag == "td")}
        assert "battery 8% < 20% and not charging" in rows["low"]
        assert "too hot: 61.5 C > 45.0 C" in rows["hot"]
        assert "on a metered network" in rows["metered"]
        wait_for(lambda: server.poll() is not None, 240, "the server to finish")
        assert server.returncode == 0
    finally:
        idle.t.close()
        for p in (*agents.values(), server):
            stop(p)
    row = [r for r in metrics(run_dir) if r.get("phase") == "round"][0]
    assert row["participants"] == 6 and row["accepted"] == 1 and "ok" in row["devices"]
    skipped = row["skipped"]
    assert set(skipped) == {"low", "hot", "metered", "dropper"}
    assert skipped["dropper"] == ["battery 5% < 20% and not charging"]
    assert "battery 8% < 20% and not charging" in skipped["low"]
    assert any(r.startswith("too hot: 61.5 C > 45.0 C") for r in skipped["hot"])
    assert skipped["metered"] == ["on a metered network"]
    db = sqlite3.connect(run_dir / "run.db")
    try:
        (info,) = db.execute("SELECT info FROM participation WHERE client_id='ok'").fetchone()
        during = dict(db.execute("SELECT client_id, during_round FROM skips").fetchall())
    finally:
        db.close()
    assert during == {"low": 0, "hot": 0, "metered": 0, "dropper": 1}
    assert "dropping the partial work" in (tmp_path / "dropper.log").read_text()
    info = json.loads(info)
    assert info["stopped_by"] == "conditions"  # partial work, sent
    lat = info["latency"]
    assert lat["steps"] == info["steps"] >= 1
    for phase in ("step", "forward", "backward", "optimizer"):
        assert 0 < lat[phase]["median"] <= lat[phase]["p90"] <= lat[phase]["total"]
    # the agent told the server why it stopped: its latest eligibility report
    ok_status = (tmp_path / "ok.log").read_text()
    assert "conditions broke during round 0" in ok_status
    # the report (written by the server at the end) lists the skips and the latency table
    html = (run_dir / "report.html").read_text()
    assert "Devices that sat rounds out" in html and "on a metered network" in html
    assert "Step latency on the devices" in html and "phone-midrange-6gb" in html
    with open(run_dir / "latency.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["device"] for r in rows] == ["ok"]
    assert rows[0]["class"] == "phone-midrange-6gb" and float(rows[0]["step_median_s"]) > 0
