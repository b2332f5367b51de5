"""The coordinator over the in-memory transport: a round, acks, budgets, metrics endpoint."""

from __future__ import annotations

import hashlib
import json
import threading
import urllib.request

import torch

from hfedmoe.models.hf import build_hf_model
from hfedmoe.names import ExpertId
from hfedmoe.transport.broker import free_port
from hfedmoe.transport.chunks import send_blob
from hfedmoe.transport.memory import MemoryHub
from hfedmoe.transport.topics import Topics
from hfedmoe.update import SparseUpdate
from hfedmoe.wire import encode
from server.config import RoundConfig, ServerConfig
from server.coordinator import Coordinator
from server.store import Store


def test_round_over_memory_transport_with_prometheus(tmp_path):
    model = build_hf_model("qwen3-moe", "classification", num_labels=3)
    port = free_port()
    cfg = ServerConfig(run_id="mem", run_dir=str(tmp_path), prometheus_port=port,
                       rounds=RoundConfig(rounds=1, deadline_s=60, min_devices=2,
                                          registration_timeout_s=30))
    hub = MemoryHub()
    coordinator = Coordinator(cfg, hub.connect("server"), model, None)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(rows=coordinator.run()))
    thread.start()
    topics = Topics("mem")
    devices = {d: hub.connect(d) for d in ("a", "b")}
    acks: dict[str, list] = {d: [] for d in devices}
    rounds: list = []
    for d, t in devices.items():
        t.subscribe(topics.ack(d), lambda m, d=d: acks[d].append(json.loads(m.payload)))
        t.subscribe(topics.round(), lambda m: rounds.append(json.loads(m.payload)))
        t.publish(topics.status(d), b'{"state": "online"}', retain=True)
    try:
        for budget, (d, t) in enumerate(devices.items(), start=1):
            while not any(a.get("type") == "registered" for a in acks[d]):
                t.publish(topics.register(d), json.dumps({"budget": budget,
                                                          "report": {}}).encode())
                t.run_until(lambda d=d: bool(acks[d]), 1.0)
        t = devices["a"]
        t.run_until(lambda: any(r.get("type") == "round" for r in rounds), 30)
        ann = [r for r in rounds if r.get("type") == "round"][0]
        assert ann["participants"] == ["a", "b"] and ann["budgets"] == {"a": 1, "b": 2}
        e = ExpertId(1, 2)
        delta = {k: torch.full_like(v, 0.5) for k, v in model.expert_state(e).items()}
        for d, t in devices.items():
            up = SparseUpdate("mem", 0, d, 4, delta, usage={e: 0.5}, importance={e: 0.5},
                              routed=frozenset({e}), updated=frozenset({e}),
                              base_model_hash=ann["model"]["state_hash"])
            blob = encode(up, 0.01)
            sha = hashlib.sha256(blob).hexdigest()
            send_blob(t, topics.update(d, sha), blob)
            t.run_until(lambda d=d, sha=sha: any(a.get("sha") == sha for a in acks[d]), 30)
            assert [a for a in acks[d] if a.get("sha") == sha][0]["status"] == "accepted"
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        assert 'hfedmoe_updates_total{outcome="accepted"} 2.0' in body
    finally:
        thread.join(60)
        coordinator.close()
    assert not thread.is_alive()
    row = result["rows"][-1]
    assert row["accepted"] == 2 and row["experts_updated"] == 1
    _, state = Store(tmp_path).latest_checkpoint()
    key = "layers.1.experts.2.w_in"
    torch.testing.assert_close(state[key], model.state()[key])  # server model now updated
    assert torch.allclose(state[key] - delta[key], build_hf_model(
        "qwen3-moe", "classification", num_labels=3).state()[key], atol=1e-6)
