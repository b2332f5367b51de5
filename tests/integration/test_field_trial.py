"""A field trial's eligibility and latency, end to end over a real Mosquitto: five agents
with emulated readings (battery, charging, temperature, metered network). Three sit the round
out before joining, each with its reason. Two start training and their batteries drop
mid-round: "ok" stops and sends what it trained (the run's ``on_break = "send"``), "dropper"
(whose own config says ``on_break = "drop"``) sends nothing and sits the round out. The server
records every skip with its reasons, the report lists them, and the report's latency table and
latency.csv hold the step timings the training device sent with its update."""

from __future__ import annotations

import csv
import json
import sqlite3

import pytest

from tests.integration.conftest import SMALL, merge, metrics, spawn, stop, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.slow]

READINGS = {
    "ok": {"battery_pct": 80, "charging": False, "temperature_c": 31.0, "metered": False},
    "low": {"battery_pct": 8, "charging": False, "temperature_c": 30.0, "metered": False},
    "hot": {"battery_pct": 90, "charging": True, "temperature_c": 61.5, "metered": False},
    "metered": {"battery_pct": 70, "charging": False, "temperature_c": 30.0, "metered": True},
    "dropper": {"battery_pct": 60, "charging": False, "temperature_c": 30.0, "metered": False},
}


def test_ineligible_devices_sit_out_with_reasons_and_latency_is_reported(tmp_path, mosquitto):
    run_id = "trial"
    run_dir = tmp_path / "run"
    server = spawn("server", merge(SMALL, {
        "run_id": run_id, "run_dir": str(run_dir), "max_eval_examples": 16,
        "eval_batch_size": 16, "transport": {"url": mosquitto, "keepalive": 5},
        "eligibility": {"min_battery_pct": 20, "max_temperature_c": 45, "allow_metered": False,
                        "on_break": "send", "check_every_s": 0.2},
        "rounds": {"rounds": 1, "min_devices": 5, "deadline_s": 200.0,
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
    try:
        for name in ("ok", "dropper"):
            log = tmp_path / f"{name}.log"
            wait_for(lambda log=log: log.exists() and "round 0," in log.read_text(), 240,
                     f"{name} to start training", [server])
            # its battery drops while it trains
            (tmp_path / f"{name}.json").write_text(json.dumps({**READINGS[name],
                                                               "battery_pct": 5}))
        wait_for(lambda: server.poll() is not None, 240, "the server to finish")
        assert server.returncode == 0
    finally:
        for p in (*agents.values(), server):
            stop(p)
    row = [r for r in metrics(run_dir) if r.get("phase") == "round"][0]
    assert row["participants"] == 5 and row["accepted"] == 1 and "ok" in row["devices"]
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
