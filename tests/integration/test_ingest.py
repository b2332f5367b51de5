"""Sharded ingestion on a real Mosquitto: two ``hfedmoe ingest`` workers share the update
topics through an MQTT 5 shared subscription, each validates, spools and partially aggregates;
the coordinator merges the partial aggregates at round close. One worker is SIGKILLed in the
middle of a round: everything it acknowledged still counts, and the pool restarts it."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from collections import Counter
from typing import Any

import paho.mqtt.client as mqtt
import psutil
import pytest

from hfedmoe.transport.topics import Topics
from lab.swarm import SwarmConfig, run_swarm
from tests.integration.conftest import SMALL, merge, metrics, spawn, stop, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.slow]

N = 60


def _workers(server_pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(server_pid).children(recursive=True)
            if "ingest" in " ".join(p.cmdline())]


def test_two_workers_one_killed_mid_round(tmp_path, mosquitto):
    run_id = "sharded"
    run_dir = tmp_path / "run"
    cfg = merge(SMALL, {"run_id": run_id, "run_dir": str(run_dir),
                        "max_eval_examples": 16, "eval_batch_size": 16,
                        "train": {"adapter": "lora", "lora_rank": 4},
                        "transport": {"url": mosquitto, "keepalive": 10, "protocol": "5"},
                        "ingest": {"workers": 2, "partial_timeout_s": 20.0},
                        "rounds": {"rounds": 2, "min_devices": N, "fraction": 1.0,
                                   "deadline_s": 60.0, "registration_timeout_s": 90.0}})
    server = spawn("server", cfg, tmp_path / "server.toml")
    killed: list[int] = []
    # which worker acknowledged what, as the coordinator hears it (each worker's event topic)
    accepted: Counter[str] = Counter()
    lock = threading.Lock()
    watcher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-watcher")
    host, port = mosquitto.removeprefix("mqtt://").split(":")

    def on_event(client: Any, userdata: Any, msg: Any) -> None:
        if json.loads(msg.payload).get("type") == "accepted":
            with lock:
                accepted[msg.topic.rsplit("/", 1)[-1]] += 1

    watcher.on_message = on_event
    watcher.connect(host, int(port))
    watcher.subscribe(f"{Topics(run_id).base}/ingest/event/+", qos=1)
    watcher.loop_start()

    def kill_one_worker() -> None:
        # round 0 is open; kill a worker that has acknowledged updates, while uploads flow
        end = time.monotonic() + 120
        while time.monotonic() < end and not killed:
            with lock:
                busy = [w for w, n in accepted.items() if n >= 3]
            procs = {p.cmdline()[-1]: p for p in _workers(server.pid)}
            if busy and len(procs) == 2 and busy[0] in procs:
                procs[busy[0]].send_signal(signal.SIGKILL)
                killed.append(procs[busy[0]].pid)
                return
            time.sleep(0.05)

    try:
        wait_for(lambda: len(_workers(server.pid)) == 2, 60, "two ingest workers", [server])
        killer = threading.Thread(target=kill_one_worker, daemon=True)
        killer.start()
        report = run_swarm(SwarmConfig(
            url=mosquitto, run_id=run_id, devices=N, rounds=2, budgets=(1, 2),
            train_s=(0.5, 3.0), ack_timeout_s=3.0, timeout_s=200.0, keep_uploads=True,
            config=str(tmp_path / "server.toml")))
        killer.join(5)
        wait_for(lambda: len(metrics(run_dir)) >= 3, 90, "two rounds closed", [server])
    finally:
        watcher.loop_stop()
        watcher.disconnect()
        stop(server)
    assert killed, "no worker was killed"
    log = (tmp_path / "server.log").read_text()
    assert "exited with -9; restarting" in log  # the pool started it again
    rows = [r for r in metrics(run_dir) if r.get("phase") == "round"]
    assert [r["round"] for r in rows] == [0, 1]
    uploads = report["ingest"]
    assert uploads["sent"] == 2 * N
    for row in rows:
        acked = {u["device"] for u in report["uploads"]
                 if u["round"] == row["round"] and u["status"] == "accepted"}
        # every acknowledged update is in the round's aggregate, counted once
        assert row["accepted"] == len(acked) > 0
        assert set(row["devices"]) == acked
        assert row["rejected"] == 0
    # the surviving worker wrote partial aggregates with updates in them
    logs = "".join((run_dir / "ingest" / f"w{i}.log").read_text() for i in range(2))
    assert re.search(r"round 1 closed with [1-9]", logs)
    # the killed worker had acknowledged updates: the coordinator read them back from the spool
    assert "read back from the spool" in log


def test_workers_in_directories_of_their_own_share_only_postgres_broker_and_spool(
        tmp_path, mosquitto, pg_schema):
    """Ingestion as on several hosts: the server starts no workers (``ingest.spawn = false``);
    two ``hfedmoe ingest --work-dir`` processes, each in a directory of its own, reach the
    coordinator only through the broker, one PostgreSQL schema and a spool directory."""
    import os
    import subprocess
    import sys

    url, schema = pg_schema
    run_id, n = "hosts", 30
    run_dir, spool = tmp_path / "run", tmp_path / "shared-spool"
    cfg = merge(SMALL, {"run_id": run_id, "run_dir": str(run_dir),
                        "max_eval_examples": 16, "eval_batch_size": 16,
                        "train": {"adapter": "lora", "lora_rank": 4},
                        "transport": {"url": mosquitto, "keepalive": 10, "protocol": "5"},
                        "store": {"url": url, "schema": schema, "spool_dir": str(spool)},
                        "ingest": {"workers": 2, "spawn": False, "partial_timeout_s": 20.0},
                        "rounds": {"rounds": 1, "min_devices": n, "fraction": 1.0,
                                   "deadline_s": 60.0, "registration_timeout_s": 90.0}})
    server = spawn("server", cfg, tmp_path / "server.toml")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    hosts = []
    for i in range(2):
        work = tmp_path / f"host{i}"
        work.mkdir()
        with open(work / "ingest.log", "w") as log:
            hosts.append(subprocess.Popen(
                [sys.executable, "-m", "hfedmoe.cli", "ingest", "--config",
                 str(tmp_path / "server.toml"), "--worker", f"w{i}", "--work-dir", str(work)],
                cwd=work, stdout=log, stderr=subprocess.STDOUT, env=env))
    try:
        wait_for(lambda: (tmp_path / "server.log").read_text().count(" online (") >= 2, 240,
                 "two ingest workers online", [server, *hosts])
        report = run_swarm(SwarmConfig(
            url=mosquitto, run_id=run_id, devices=n, rounds=1, budgets=(1, 2),
            train_s=(0.2, 1.0), ack_timeout_s=3.0, timeout_s=150.0, keep_uploads=True,
            config=str(tmp_path / "server.toml")))
        wait_for(lambda: len(metrics(run_dir)) >= 2, 90, "the round closed", [server])
    finally:
        stop(server)
        for proc in hosts:
            stop(proc)
    [row] = [r for r in metrics(run_dir) if r.get("phase") == "round"]
    acked = {u["device"] for u in report["uploads"] if u["status"] == "accepted"}
    assert row["accepted"] == len(acked) == n and row["rejected"] == 0
    logs = [(tmp_path / f"host{i}" / "ingest.log").read_text() for i in range(2)]
    assert all(re.search(r"round 0 closed with [1-9]", text) for text in logs)  # both took some
    assert sorted(p.name for p in (spool / "partials" / "r0").iterdir()) == \
        ["w0.safetensors", "w1.safetensors"]
    assert (spool / "checkpoints" / "global_r0.safetensors").is_file()
    # nothing of the run in the coordinator's directory but its own files, none in the workers'
    assert not (run_dir / "run.db").exists() and not (run_dir / "updates").exists()
    for i in range(2):
        assert sorted(p.name for p in (tmp_path / f"host{i}").iterdir()) == ["ingest.log"]
