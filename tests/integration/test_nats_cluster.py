"""The kit on a broker cluster: a 3-node NATS cluster speaking MQTT 3.1.1, the coordinator on
one node, the devices on the others (docs/deployment.md, "On a NATS cluster").

NATS has no MQTT 5, so no shared subscriptions: the coordinator ingests every update itself
(``ingest.workers = 0``) and says so. Everything else the kit needs crosses the nodes: the
retained round announcement and device status, registration and its ack, the chunked model
download and the update upload, the last will."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file

from hfedmoe.config import ModelConfig
from hfedmoe.models import build_model
from hfedmoe.protocol import Done, decode_round
from hfedmoe.transport.config import TransportConfig
from hfedmoe.transport.mqtt import MqttTransport
from hfedmoe.transport.topics import Topics
from lab.swarm import SwarmConfig, run_swarm
from tests.integration.conftest import SMALL, merge, metrics, spawn, stop, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(600)]

COORDINATOR_ONLY = "ingestion: coordinator only (transport.protocol 3.1.1: no shared subscriptions)"


def _server_cfg(tmp_path, url: str, run_id: str, **rounds) -> dict:
    return merge(SMALL, {"run_id": run_id, "run_dir": str(tmp_path / "run"),
                         "max_eval_examples": 32, "eval_batch_size": 32,
                         "transport": {"url": url, "keepalive": 10},
                         "rounds": {"registration_timeout_s": 120.0, **rounds}})


def _retained_round(url: str, run_id: str) -> object:
    """What a client that connects to ``url`` now gets on the run's round topic (retained)."""
    got: list[bytes] = []
    t = MqttTransport(TransportConfig(url=url), "late-reader", persistent=False)
    try:
        t.subscribe(Topics(run_id).round(), lambda m: got.append(m.payload) if m.retain else None)
        assert t.run_until(lambda: bool(got), 30), "no retained message on the round topic"
    finally:
        t.close()
    return decode_round(got[0])


def test_a_round_with_the_coordinator_and_the_devices_on_different_nodes(tmp_path, nats_nodes):
    """Server on node 0, one real agent on node 1 and one on node 2: both register, get the
    round, train, upload and are acknowledged; the round aggregates both updates and the
    global model moves."""
    a, b, c = nats_nodes
    run_id = "nats"
    cfg = _server_cfg(tmp_path, a.url, run_id, rounds=1, min_devices=2, deadline_s=240.0)
    t0 = time.monotonic()
    server = spawn("server", cfg, tmp_path / "server.toml")
    agents = {}
    for i, (name, node) in enumerate((("dev-b", b), ("dev-c", c))):
        agents[name] = spawn("agent", merge(SMALL, {
            "device_id": name, "run_id": run_id, "work_dir": str(tmp_path / name),
            "shard": i, "num_shards": 2, "emulate": "laptop-cpu-16gb",
            "upload_margin_s": 5.0, "matmul_seconds": 0.2, "train": {"max_steps": 10},
            "transport": {"url": node.url, "keepalive": 10}}), tmp_path / f"{name}.toml")
    try:
        wait_for(lambda: server.poll() is not None, 480, "the server to finish the round",
                 list(agents.values()))
        wall = time.monotonic() - t0
    finally:
        for p in (*agents.values(), server):
            stop(p)
    log = (tmp_path / "server.log").read_text()
    assert server.returncode == 0, log[-3000:]
    assert COORDINATOR_ONLY in log
    [row] = [r for r in metrics(tmp_path / "run") if r.get("phase") == "round"]
    assert row["participants"] == 2 and row["accepted"] == 2 and row["rejected"] == 0
    assert sorted(row["devices"]) == ["dev-b", "dev-c"]
    # each agent's own record: its update of round 0 was acknowledged as accepted
    for name in agents:
        records = [json.loads(x) for x in
                   (tmp_path / name / "agent.jsonl").read_text().splitlines() if x.strip()]
        assert [r["status"] for r in records] == ["accepted"], records
    # the global model moved away from the initial one (same config and seed as the server's)
    initial = build_model(ModelConfig(num_experts=2, top_k=1, max_length=32),
                          "classification", 10).state()
    final = load_file(tmp_path / "run" / "checkpoints" / "global_r0.safetensors")
    moved = [k for k in initial if not torch.equal(initial[k], final[k])]
    assert any(".experts." in k for k in moved), moved
    # the run's retained end-of-run message, published on node 0, reaches a client that
    # connects to node 2 afterwards (NATS keeps retained messages cluster-wide)
    assert isinstance(_retained_round(c.url, run_id), Done)
    print(f"nats round: {wall:.1f} s from server start to the end of the run; "
          f"round_s {row['round_s']:.1f}")


def test_swarm_spread_over_the_nodes_registers_and_hears_the_round(tmp_path, nats_nodes):
    """200 protocol-level devices, a third on each node, the server on node 0: all register,
    all receive the round announcement, the participants' updates are accepted."""
    n = 200
    run_id = "natswarm"
    cfg = merge(_server_cfg(tmp_path, nats_nodes[0].url, run_id, rounds=1, min_devices=n,
                            fraction=0.25, deadline_s=90.0),
                {"max_eval_examples": 16, "eval_batch_size": 16,
                 "train": {"adapter": "lora", "lora_rank": 4}})
    server = spawn("server", cfg, tmp_path / "server.toml")
    urls = ",".join(node.url for node in nats_nodes)
    try:
        report = run_swarm(SwarmConfig(
            url=urls, run_id=run_id, devices=n, rounds=1, budgets=(1, 2), train_s=(0.2, 1.0),
            ack_timeout_s=5.0, timeout_s=180.0, config=str(tmp_path / "server.toml")),
            watch={"server": server.pid})
        wait_for(lambda: len(metrics(tmp_path / "run")) >= 2, 90, "round 0 closed", [server])
    finally:
        stop(server)
    assert not report["timed_out"], report["errors"]
    assert report["registered"] == n and report["connected"] == n
    by_url = report["by_url"]
    assert sorted(by_url) == sorted(node.url for node in nats_nodes)
    for row in by_url.values():  # every node had its share, and all of them heard the round
        assert row["devices"] in (66, 67)
        assert row["registered"] == row["announced"] == row["devices"]
    ann = report["announce"]["0"]
    assert ann["participants"] == n // 4 and ann["received_by"] == n
    ingest = report["ingest"]
    assert ingest["sent"] == n // 4 and ingest["status"] == {"accepted": n // 4}
    [row] = [r for r in metrics(tmp_path / "run") if r.get("phase") == "round"]
    assert row["accepted"] == n // 4 and row["rejected"] == 0
    print(f"nats swarm: all {n} registered in {report['all_registered_s']} s; announcement "
          f"fan-out p50 {ann['fanout_s']['p50']} s, max {ann['fanout_s']['max']} s; "
          f"{ingest['updates_per_s']} updates/s; by node {by_url}")


def test_a_subscription_the_broker_refuses_is_named(nats_nodes, caplog):
    """A node that cannot take a subscription refuses it in its SUBACK (under load, when it
    cannot create the subscription's consumer; here, deterministically, a filter NATS cannot
    map to a subject): the transport names the filter instead of waiting in silence."""
    t = MqttTransport(TransportConfig(url=nats_nodes[1].url), "refused", persistent=False)
    try:
        t.subscribe("hfedmoe/v1/bad run/round", lambda m: None)
        t.wait_subscribed(10)
    finally:
        t.close()
    assert t.refused == ["hfedmoe/v1/bad run/round"]
    assert any("refused the subscription to hfedmoe/v1/bad run/round" in m
               for m in caplog.messages)
