"""The coordinator over the in-memory transport: a round, acks, budgets, metrics endpoint."""

from __future__ import annotations

import hashlib
import json
import threading
import urllib.request

import pytest
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


def _round_with(tmp_path, policy, claims):
    """One round over the memory transport; device d declares ``claims[d][0]`` examples at
    registration and sends ``claims[d][1]`` with a delta of ``claims[d][2]`` on one expert.
    Returns the acks per device and the aggregated delta of that expert."""
    from server.config import PolicyConfig

    model = build_hf_model("qwen3-moe", "classification", num_labels=3)
    cfg = ServerConfig(run_id="pol", run_dir=str(tmp_path), policy=PolicyConfig(**policy),
                       rounds=RoundConfig(rounds=1, deadline_s=30, min_devices=len(claims),
                                          registration_timeout_s=30))
    hub = MemoryHub()
    coordinator = Coordinator(cfg, hub.connect("server"), model, None)
    thread = threading.Thread(target=coordinator.run)
    thread.start()
    topics = Topics("pol")
    devices = {d: hub.connect(d) for d in claims}
    acks: dict[str, list] = {d: [] for d in devices}
    rounds: list = []
    e = ExpertId(1, 2)
    try:
        for d, t in devices.items():
            t.subscribe(topics.ack(d), lambda m, d=d: acks[d].append(json.loads(m.payload)))
            t.subscribe(topics.round(), lambda m: rounds.append(json.loads(m.payload)))
            t.publish(topics.status(d), b'{"state": "online"}', retain=True)
            while not any(a.get("type") == "registered" for a in acks[d]):
                t.publish(topics.register(d), json.dumps({
                    "budget": 2, "report": {"local_examples": claims[d][0]}}).encode())
                t.run_until(lambda d=d: bool(acks[d]), 1.0)
        t = next(iter(devices.values()))
        t.run_until(lambda: any(r.get("type") == "round" for r in rounds), 30)
        ann = [r for r in rounds if r.get("type") == "round"][0]
        for d, t in devices.items():
            delta = {k: torch.full_like(v, claims[d][2]) for k, v in model.expert_state(e).items()}
            up = SparseUpdate("pol", 0, d, claims[d][1], delta, usage={e: 0.5},
                              importance={e: 0.5}, routed=frozenset({e}),
                              updated=frozenset({e}), base_model_hash=ann["model"]["state_hash"])
            blob = encode(up, 0.01)
            sha = hashlib.sha256(blob).hexdigest()
            send_blob(t, topics.update(d, sha), blob)
            t.run_until(lambda d=d, sha=sha: any(a.get("sha") == sha for a in acks[d]), 30)
    finally:
        thread.join(60)
        coordinator.close()
    _, state = Store(tmp_path).latest_checkpoint()
    key = "layers.1.experts.2.w_in"
    base = build_hf_model("qwen3-moe", "classification", num_labels=3).state()[key]
    return acks, float((state[key] - base).mean())


def test_inflated_example_count_is_rejected_and_cannot_move_the_model(tmp_path):
    acks, moved = _round_with(tmp_path, {}, {"a": (4, 4, 1.0), "b": (4, 10**9, 0.0)})
    b = [x for x in acks["b"] if x.get("sha")][-1]
    assert b["status"] == "rejected" and b["error"] == "PolicyError"
    assert moved == pytest.approx(1.0, abs=1e-5)  # only a's update was averaged


def test_inflated_example_count_is_clipped_to_the_policy(tmp_path):
    # b declared 4 examples at registration and claims 1e9: clipped to 4, so the two updates
    # weigh the same and the expert moves by their plain mean
    acks, moved = _round_with(tmp_path, {"on_violation": "clip"},
                              {"a": (4, 4, 1.0), "b": (4, 10**9, 0.0)})
    assert all([x for x in acks[d] if x.get("sha")][-1]["status"] == "accepted" for d in acks)
    assert moved == pytest.approx(0.5, abs=1e-5)


def test_inflated_registration_is_refused(tmp_path):
    from server.config import PolicyConfig

    assert PolicyConfig().examples_cap(4, [4, 4, 10**6]) == 4
    assert PolicyConfig(examples_vs_registered=0).examples_cap(10**6, [4, 4, 10**6]) == 40
    assert PolicyConfig(examples_vs_registered=0, examples_vs_median=0).examples_cap(
        5, [5]) is None
    model = build_hf_model("qwen3-moe", "classification", num_labels=3)
    hub = MemoryHub()
    server = hub.connect("server")
    coordinator = Coordinator(ServerConfig(run_id="pol", run_dir=str(tmp_path)), server, model,
                              None)
    coordinator.start()
    dev = hub.connect("a")
    acks: list = []
    dev.subscribe(Topics("pol").ack("a"), lambda m: acks.append(json.loads(m.payload)))
    dev.publish(Topics("pol").register("a"), json.dumps(
        {"budget": 2, "report": {"local_examples": 10**12}}).encode())
    for _ in range(50):
        server.run_until(lambda: False, 0.05)
        if dev.run_until(lambda: bool(acks), 0.05):
            break
    coordinator.close()
    assert acks and acks[0]["type"] == "error" and acks[0]["error"] == "PolicyError"
    assert "a" not in Store(tmp_path).devices()


def test_retention_keeps_the_last_checkpoints_and_the_best(tmp_path):
    model = build_hf_model("qwen3-moe", "classification", num_labels=3)
    store = Store(tmp_path)
    state = model.state()
    for r, acc in enumerate([0.3, 0.9, 0.5, 0.6, 0.4]):
        store.spool_update(r, "a", b"x" * 1000, 4)
        store.open_round(r, 0.0, ["a"], "h")
        store.save_checkpoint(r, state, {"accuracy": acc}, f"h{r}")
        store.prune(r, keep_updates=False, keep_checkpoints=2, keep_best=True)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["global_r1.safetensors", "global_r3.safetensors", "global_r4.safetensors"]
    assert not list((tmp_path / "updates").iterdir())  # folded into durable checkpoints
    assert store.latest_checkpoint()[0] == 4
    store.spool_update(5, "a", b"y" * 1000, 4)  # an open round's updates stay
    store.prune(4, keep_updates=False, keep_checkpoints=2, keep_best=True)
    assert store.read_update(store.update(5, "a")) == b"y" * 1000


def test_full_disk_rejects_updates_cleanly_and_keeps_what_was_accepted(tmp_path):
    """A run-directory quota stands in for a full disk: the update that does not fit is
    refused with DiskFullError, the one accepted before it survives and is aggregated."""
    from hfedmoe.errors import DiskFullError
    from server.config import RetentionConfig

    store = Store(tmp_path / "probe")
    store.check_room(10, 0, 0)
    with pytest.raises(DiskFullError, match="free"):
        store.check_room(10, 1 << 62, 0)
    store.close()
    model = build_hf_model("qwen3-moe", "classification", num_labels=3)
    e = ExpertId(1, 2)
    delta = {k: torch.full_like(v, 1.0) for k, v in model.expert_state(e).items()}
    pad = {"note": "x" * 400_000}  # a 0.4 MB update, far above the database's growth
    one = len(encode(SparseUpdate("disk", 0, "a", 4, delta, usage={e: 0.5}, importance={
        e: 0.5}, routed=frozenset({e}), updated=frozenset({e}), base_model_hash="0" * 64,
        meta=pad), 0.01))
    run_dir = tmp_path / "run"
    Store(run_dir).close()
    quota = (sum(p.stat().st_size for p in run_dir.rglob("*") if p.is_file()) + 1.5 * one
             ) / 2**20  # room for one update (the database grows by far less than 0.5 of one)
    cfg = ServerConfig(run_id="disk", run_dir=str(run_dir),
                       retention=RetentionConfig(min_free_mb=0, max_run_dir_mb=quota),
                       rounds=RoundConfig(rounds=1, deadline_s=20, min_devices=2,
                                          registration_timeout_s=30))
    hub = MemoryHub()
    coordinator = Coordinator(cfg, hub.connect("server"), model, None)
    thread = threading.Thread(target=coordinator.run)
    thread.start()
    topics = Topics("disk")
    devices = {d: hub.connect(d) for d in ("a", "b")}
    acks: dict[str, list] = {d: [] for d in devices}
    rounds: list = []
    try:
        for d, t in devices.items():
            t.subscribe(topics.ack(d), lambda m, d=d: acks[d].append(json.loads(m.payload)))
            t.subscribe(topics.round(), lambda m: rounds.append(json.loads(m.payload)))
            t.publish(topics.status(d), b'{"state": "online"}', retain=True)
            while not any(a.get("type") == "registered" for a in acks[d]):
                t.publish(topics.register(d), json.dumps({"budget": 2, "report": {}}).encode())
                t.run_until(lambda d=d: bool(acks[d]), 1.0)
        t = devices["a"]
        t.run_until(lambda: any(r.get("type") == "round" for r in rounds), 30)
        ann = [r for r in rounds if r.get("type") == "round"][0]
        for d, t in devices.items():
            up = SparseUpdate("disk", 0, d, 4, delta, usage={e: 0.5}, importance={e: 0.5},
                              routed=frozenset({e}), updated=frozenset({e}),
                              base_model_hash=ann["model"]["state_hash"], meta=pad)
            blob = encode(up, 0.01)
            sha = hashlib.sha256(blob).hexdigest()
            send_blob(t, topics.update(d, sha), blob)
            t.run_until(lambda d=d, sha=sha: any(a.get("sha") == sha for a in acks[d]), 30)
    finally:
        thread.join(60)
        coordinator.close()
    assert not thread.is_alive()
    last = {d: [x for x in acks[d] if x.get("sha")][-1] for d in acks}
    assert last["a"]["status"] == "accepted"
    assert last["b"]["status"] == "rejected" and last["b"]["error"] == "DiskFullError"
    store = Store(run_dir)
    assert [r["error"] for r in store.rejections()] == ["DiskFullError"]
    _, state = store.latest_checkpoint()
    key = "layers.1.experts.2.w_in"
    base = build_hf_model("qwen3-moe", "classification", num_labels=3).state()[key]
    assert torch.allclose(state[key] - base, torch.ones_like(base), atol=1e-6)  # a's update


def test_malformed_lora_factors_are_rejected_and_the_model_is_unchanged(tmp_path):
    """A LoRA run's server refuses factors of the wrong rank, a lone factor, and a factor sent
    beside a dense delta of the same weight, each with its typed error; nothing moves."""
    from hfedmoe.config import TrainConfig
    from hfedmoe.lora import factor_keys

    model = build_hf_model("qwen3-moe", "classification", num_labels=3)
    before = model.state()
    cfg = ServerConfig(run_id="lora", run_dir=str(tmp_path), train=TrainConfig(adapter="lora"),
                       rounds=RoundConfig(rounds=1, deadline_s=15, min_devices=2,
                                          registration_timeout_s=30))
    hub = MemoryHub()
    coordinator = Coordinator(cfg, hub.connect("server"), model, None)
    thread = threading.Thread(target=coordinator.run)
    thread.start()
    topics = Topics("lora")
    devices = {d: hub.connect(d) for d in ("a", "b")}
    acks: dict[str, list] = {d: [] for d in devices}
    rounds: list = []
    e = ExpertId(1, 2)
    w = "layers.1.experts.2.w_in"
    out_f, in_f = before[w].shape
    a_key, b_key = factor_keys(w)
    bad = {"ShapeError": {a_key: torch.ones(4, in_f), b_key: torch.ones(out_f, 4)},  # rank 4
           "SchemaError": {a_key: torch.ones(8, in_f)}}  # A without B
    try:
        for d, t in devices.items():
            t.subscribe(topics.ack(d), lambda m, d=d: acks[d].append(json.loads(m.payload)))
            t.subscribe(topics.round(), lambda m: rounds.append(json.loads(m.payload)))
            t.publish(topics.status(d), b'{"state": "online"}', retain=True)
            while not any(a.get("type") == "registered" for a in acks[d]):
                t.publish(topics.register(d), json.dumps({"budget": 2, "report": {}}).encode())
                t.run_until(lambda d=d: bool(acks[d]), 1.0)
        t = devices["a"]
        t.run_until(lambda: any(r.get("type") == "round" for r in rounds), 30)
        ann = [r for r in rounds if r.get("type") == "round"][0]
        for expected, deltas in bad.items():
            up = SparseUpdate("lora", 0, "a", 4, deltas, usage={e: 0.5}, importance={e: 0.5},
                              routed=frozenset({e}), updated=frozenset({e}),
                              base_model_hash=ann["model"]["state_hash"])
            blob = encode(up, 0.01)
            sha = hashlib.sha256(blob).hexdigest()
            send_blob(t, topics.update("a", sha), blob)
            t.run_until(lambda sha=sha: any(a.get("sha") == sha for a in acks["a"]), 30)
            ack = [a for a in acks["a"] if a.get("sha") == sha][0]
            assert ack["status"] == "rejected" and ack["error"] == expected, ack
    finally:
        thread.join(60)
        coordinator.close()
    assert not thread.is_alive()
    _, state = Store(tmp_path).latest_checkpoint()
    assert all(torch.equal(state[k], before[k]) for k in state)


def test_the_server_evaluates_on_the_split_eval_split_names(tmp_path, monkeypatch,
                                                            minilm_available):
    """``hfedmoe server`` hands the coordinator ``Task.held_out``: with ``data.eval_split =
    "validation"`` it evaluates the validation examples, and its rows say so."""
    if not minilm_available:
        pytest.skip("assets extra not installed")
    import hfedmoe.transport.mqtt
    from hfedmoe.config import from_dict
    from hfedmoe.data import load_task
    from server.cli import build_server

    hub = MemoryHub()
    monkeypatch.setattr(hfedmoe.transport.mqtt, "open_transport",
                        lambda cfg, client_id, *a: (hub.connect(client_id), None))
    cfg = from_dict(ServerConfig, {
        "run_id": "val", "run_dir": str(tmp_path), "max_eval_examples": 0,
        "model": {"num_experts": 2, "top_k": 1, "max_length": 32, "upcycle": "copy"},
        "data": {"validation_fraction": 0.05, "eval_split": "validation"}})
    task = load_task(cfg.data)
    coordinator, transport, broker = build_server(cfg)
    try:
        assert broker is None and coordinator.test_data.texts == task.validation.texts
        metrics = coordinator._evaluate()
        assert metrics["eval_split"] == "validation"
        assert metrics["examples"] == len(task.validation) != len(task.test)
    finally:
        coordinator.close()
        transport.close()
