"""Integration fixtures: a plain Mosquitto on a free port, server/agent subprocesses, and fake
devices that speak the protocol by hand (to send exactly the update a test needs)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from hfedmoe.transport.broker import free_port
from hfedmoe.transport.chunks import send_blob
from hfedmoe.transport.config import TransportConfig
from hfedmoe.transport.mqtt import MqttTransport
from hfedmoe.transport.topics import Topics
from tests.broker_required import MOSQUITTO, need_mosquitto

# A small but real model: pretrained MiniLM upcycled to 2 experts, top-1.
SMALL = {"model": {"num_experts": 2, "top_k": 1, "max_length": 32},
         "train": {"lr": 1e-3, "batch_size": 8, "threads": 1}}


def _wait_port(port: int, timeout: float = 10.0) -> None:
    import socket

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[str]:
    """A plain, anonymous Mosquitto of this test only; stopped by PID."""
    need_mosquitto()  # skips, or fails under HFEDMOE_REQUIRE_BROKER=1
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "max_queued_messages 100000\n")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_port(port)
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def nats_nodes(tmp_path: Path) -> Iterator[list[Any]]:
    """A 3-node NATS cluster with MQTT 3.1.1 on every node, of this test only
    (:mod:`tests.nats_cluster`); each node's ``url`` is its MQTT listener."""
    from tests.nats_cluster import nats_cluster

    with nats_cluster(tmp_path / "nats", size=3) as nodes:
        yield nodes


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def spawn(kind: str, cfg: dict[str, Any], path: Path,
          python: str = sys.executable) -> subprocess.Popen:
    """``hfedmoe server|agent --config path`` as a subprocess of ``python``; output in
    ``path``.log."""
    path.write_text(tomli_w.dumps(cfg))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log = open(path.with_suffix(".log"), "w")  # noqa: SIM115
    return subprocess.Popen([python, "-m", "hfedmoe.cli", kind, "--config", str(path)],
                            stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def wait_for(pred, timeout: float, what: str, procs: list[subprocess.Popen] = ()) -> None:
    end = time.monotonic() + timeout
    while not pred():
        for p in procs:
            if p.poll() is not None and p.returncode != 0:
                raise AssertionError(f"a process exited with {p.returncode} while waiting "
                                     f"for {what}")
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


class FakeDevice:
    """Registers and sends hand-made update blobs; records acks and announcements."""

    def __init__(self, url: str, run_id: str, device_id: str) -> None:
        self.topics = Topics(run_id)
        self.device_id = device_id
        self.t = MqttTransport(TransportConfig(url=url), device_id,
                               self.topics.status(device_id))
        self.acks: list[dict[str, Any]] = []
        self.rounds: list[dict[str, Any]] = []
        self.t.subscribe(self.topics.ack_tree(device_id), self._ack)
        self.t.subscribe(self.topics.round(), lambda m: self.rounds.append(json.loads(m.payload)))
        self.t.wait_subscribed()
        self.t.publish(self.topics.status(device_id), b'{"state": "online"}', retain=True)

    def _ack(self, message) -> None:
        if "/resend/" not in message.topic:
            self.acks.append(json.loads(message.payload))

    def register(self, budget: int = 2, payload: bytes | None = None,
                 timeout: float = 90.0) -> None:
        """Register (again every 3 s, as the server may still be starting) until answered."""
        body = payload if payload is not None else json.dumps(
            {"device_id": self.device_id, "budget": budget,
             "report": {"local_examples": 100}}).encode()  # what an agent declares
        end = time.monotonic() + timeout
        while True:
            n = len(self.acks)
            self.t.publish(self.topics.register(self.device_id), body)
            if self.t.run_until(lambda n=n: len(self.acks) > n, 3.0):
                return
            assert time.monotonic() < end, f"{self.device_id}: registration not answered"

    def wait(self, pred, timeout: float = 60.0, what: str = "a message") -> None:
        ok = self.t.run_until(pred, timeout)
        assert ok, f"{self.device_id}: timed out waiting for {what}"

    def send(self, blob: bytes) -> str:
        sha = hashlib.sha256(blob).hexdigest()
        self.sender = send_blob(self.t, self.topics.update(self.device_id, sha), blob,
                                chunk_size=1 << 16)
        return sha

    def ack_for(self, sha: str) -> dict[str, Any] | None:
        return next((a for a in self.acks if a.get("sha") == sha), None)

    def close(self) -> None:
        self.t.close()
