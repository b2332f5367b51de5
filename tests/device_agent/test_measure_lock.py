"""Agents that share one host time it one at a time (the demo's emulated devices), and an
emulated device takes the host's matmul throughput next to its step costs, under the lock."""

from __future__ import annotations

import argparse
import fcntl
import threading
from types import SimpleNamespace

import torch

from device_agent.capacity import Capacity, host_lock
from device_agent.config import AgentConfig
from device_agent.resources import probe_device
from hfedmoe.config import load_config


def _locked(path) -> bool:
    """Whether another open file description holds ``path``'s exclusive lock."""
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


def test_host_lock_is_exclusive(tmp_path):
    path = str(tmp_path / "m" / "measure.lock")
    inside, release, order = threading.Event(), threading.Event(), []

    def first() -> None:
        with host_lock(path):
            order.append("a in")
            inside.set()
            release.wait(30)
            order.append("a out")

    def second() -> None:
        with host_lock(path):
            order.append("b in")

    a = threading.Thread(target=first)
    a.start()
    assert inside.wait(30)
    b = threading.Thread(target=second)
    b.start()
    b.join(0.5)
    assert b.is_alive() and order == ["a in"]  # b waits while a holds the lock
    release.set()
    a.join(30)
    b.join(30)
    assert order == ["a in", "a out", "b in"]
    assert not _locked(path)
    with host_lock(""):  # no path: no lock, no file
        pass


def test_demo_devices_share_one_measure_lock(tmp_path):
    from lab.launch import write_configs

    args = argparse.Namespace(strategy="hfedmoe", rounds=1, deadline=60.0, devices=3,
                              overrides=[], dashboard_port=0)
    _, paths = write_configs(tmp_path, "mqtt://127.0.0.1:1883", args, "demo-1")
    locks = {load_config(AgentConfig, p).measure_lock for p in paths}
    assert locks == {str(tmp_path / "agents" / "measure.lock")}


def test_emulated_agent_times_the_host_under_the_lock(tmp_path, monkeypatch):
    import device_agent.costs as costs

    lock = tmp_path / "measure.lock"
    seen = {}

    def fake_measure_costs(model, batch_size, seq_len, *args, **kwargs):
        seen["locked"] = _locked(lock)
        seen["host_matmul"] = dict(agent.host.matmul)
        return "costs"

    monkeypatch.setattr(costs, "measure_costs", fake_measure_costs)
    cfg = AgentConfig(device_id="dev0", emulate="phone-midrange-6gb", matmul_seconds=0.01,
                      measure_lock=str(lock))
    host = probe_device(matmul_seconds=0)  # as setup probes an emulated device's host
    agent = Capacity(cfg, SimpleNamespace(module=torch.nn.Linear(4, 4)), 16, host, host)
    assert not agent.host.matmul
    assert agent.measure(8, 32) == "costs"
    assert seen["locked"]  # measured while holding the host's lock
    assert "float32" in seen["host_matmul"] and seen["host_matmul"]["float32"].gflops > 0
    assert not _locked(lock)  # released after
