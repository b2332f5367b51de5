"""Bounded updates on the server: the [policy] class caps and norm bounds, [aggregation]'s
robust option, through the config, the update intake and a round over the memory transport."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading

import pytest
import torch

from hfedmoe.aggregator import Aggregator
from hfedmoe.config import from_dict
from hfedmoe.errors import ConfigError
from hfedmoe.models.hf import build_hf_model
from hfedmoe.modelsync import build_shards
from hfedmoe.names import ExpertId
from hfedmoe.protocol import UpdateAck
from hfedmoe.robust import expert_norms
from hfedmoe.transport.chunks import send_blob
from hfedmoe.transport.memory import MemoryHub
from hfedmoe.transport.topics import Topics
from hfedmoe.update import SparseUpdate
from hfedmoe.wire import encode
from server.bounds import device_class, expert_cap, round_strategy
from server.config import AggregationConfig, IngestConfig, PolicyConfig, RoundConfig, ServerConfig
from server.coordinator import Coordinator
from server.intake import Intake
from server.registry import DeclaredExamples
from server.rounds import RoundState
from server.store import Store

RUN = "bounds"
E12, E13 = ExpertId(1, 2), ExpertId(1, 3)


# --- config ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("section", "args", "field"), [
    (PolicyConfig, {"class_caps": {"android": -1}}, "policy.class_caps.android"),
    (PolicyConfig, {"default_class_cap": -2}, "policy.default_class_cap"),
    (PolicyConfig, {"max_update_norm": -1.0}, "policy.max_update_norm"),
    (PolicyConfig, {"max_expert_norm": float("nan")}, "policy.max_expert_norm"),
    (PolicyConfig, {"on_norm_violation": "drop"}, "policy.on_norm_violation"),
    (AggregationConfig, {"robust": "median"}, "aggregation.robust"),
    (AggregationConfig, {"trim_fraction": 0.5}, "aggregation.trim_fraction"),
    (AggregationConfig, {"kinds": ("router",)}, "aggregation.kinds"),
])
def test_bad_bounds_config_names_the_field(section, args, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        section(**args)


def test_robust_aggregation_refuses_ingest_workers():
    with pytest.raises(ConfigError, match=r"aggregation\.robust"):
        ServerConfig(aggregation=AggregationConfig(robust="trimmed-mean"),
                     ingest=IngestConfig(workers=2))


@pytest.mark.parametrize("section", [
    {"aggregation": {"robust": "trimmed-mean"}}, {"policy": {"max_update_norm": 5.0}},
    {"policy": {"max_expert_norm": 1.0}}, {"policy": {"class_caps": {"android": 4}}},
    {"policy": {"default_class_cap": 8}}])
def test_secure_aggregation_refuses_what_needs_plain_rounds(section):
    # the server sees only masked sums: it can neither trim nor measure one update's norm,
    # and a secure round's intake does not apply the class caps
    with pytest.raises(ConfigError, match=r"secagg\.enabled"):
        from_dict(ServerConfig, {"secagg": {"enabled": True}, **section})
    assert from_dict(ServerConfig, {"secagg": {"enabled": True}}).secagg.enabled


def test_the_sections_load_from_toml_tables_and_default_to_off():
    cfg = from_dict(ServerConfig, {
        "policy": {"class_caps": {"android": 4, "jetson": 16}, "max_expert_norm": 2.5,
                   "on_norm_violation": "clip"},
        "aggregation": {"robust": "trimmed-mean", "trim_fraction": 0.2}})
    assert cfg.policy.class_caps == {"android": 4, "jetson": 16}
    assert round_strategy(cfg).rule.robust == "trimmed-mean"
    default = ServerConfig()
    assert (default.policy.class_caps, default.policy.max_update_norm,
            default.policy.max_expert_norm, default.aggregation.robust) == ({}, 0.0, 0.0, "none")
    assert round_strategy(default).rule.robust == "none"


def test_a_device_class_is_the_platform_its_registration_reports():
    policy = PolicyConfig(class_caps={"android": 2}, default_class_cap=8)
    assert device_class({"platform": " Android "}) == "android"
    assert device_class({}) == device_class(None) == device_class({"platform": 3}) == "unknown"
    assert expert_cap(policy, {"platform": "android"}, 5)[0] == 2  # the class caps it
    assert expert_cap(policy, {"platform": "android"}, 1)[0] == 1  # its own budget is lower
    assert expert_cap(policy, {"platform": "jetson"}, 20)[0] == 8  # not listed: the default
    assert expert_cap(PolicyConfig(), {"platform": "jetson"}, 20)[0] == 20  # no caps: today's


# --- the intake ------------------------------------------------------------------------------
class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.sent.append((topic, payload))

    def acks(self, device: str) -> list[UpdateAck]:
        return [UpdateAck.from_bytes(p) for t, p in self.sent if t == Topics(RUN).ack(device)]


@dataclasses.dataclass
class Holder:
    round: RoundState | None
    next_round: int
    aggregator: Aggregator


@pytest.fixture(scope="module")
def model():
    return build_hf_model("qwen3-moe", "classification", num_labels=3)


@pytest.fixture
def make(tmp_path, model):
    """An intake where a phone (android, budget 4) and a laptop (linux, budget 4) registered,
    round 0 open with both."""
    stores = []

    def build(**cfg_args):
        cfg = ServerConfig(run_id=RUN, run_dir=str(tmp_path), **cfg_args)
        store = Store(tmp_path)
        store.upsert_devices([("phone", {"local_examples": 4, "platform": "android"}, 4),
                              ("laptop", {"local_examples": 4, "platform": "linux"}, 4)])
        strategy = round_strategy(cfg)
        manifest, _ = build_shards(model.state())
        holder = Holder(RoundState(0, ["phone", "laptop"], 1e12, manifest.state_hash, manifest,
                                   expected=2), 0, strategy.make_aggregator())
        transport = Recorder()
        intake = Intake(cfg, transport, store, model.state(), holder, strategy=strategy,
                        declared=DeclaredExamples(store))
        stores.append(store)
        return intake, holder, transport, manifest.state_hash

    yield build
    for store in stores:
        store.close()


def _update(model, device: str, base_hash: str, experts=(E12,), value: float = 0.5,
            run: str = RUN) -> SparseUpdate:
    delta = {k: torch.full_like(v, value) for e in experts
             for k, v in model.expert_state(e).items()}
    return SparseUpdate(run, 0, device, 4, delta, usage={e: 0.5 for e in experts},
                        importance={e: 0.5 for e in experts}, routed=frozenset(experts),
                        updated=frozenset(experts), base_model_hash=base_hash)


def _send(intake: Intake, update: SparseUpdate) -> str:
    blob = encode(update, 0.01)
    sha = hashlib.sha256(blob).hexdigest()
    intake.receive(Topics(RUN).update(update.client_id, sha).prefix, blob)
    return sha


def test_an_update_over_its_class_cap_is_rejected_whatever_the_device_registered(make, model):
    intake, holder, transport, base = make(policy=PolicyConfig(class_caps={"android": 1}))

    sha = _send(intake, _update(model, "phone", base, experts=(E12, E13)))
    _send(intake, _update(model, "laptop", base, experts=(E12, E13)))  # linux: not capped

    [ack] = transport.acks("phone")
    assert (ack.status, ack.error, ack.sha) == ("rejected", "BudgetExceededError", sha)
    assert "'android' is 1" in ack.reason
    assert [a.status for a in transport.acks("laptop")] == ["accepted"]
    assert set(holder.aggregator.summaries) == {"laptop"}
    assert [x["client"] for x in intake.store.rejections()] == ["phone"]
    assert intake.store.update(0, "phone") is None


def test_an_update_over_a_norm_bound_is_rejected_and_nothing_of_it_kept(make, model):
    norm = expert_norms(_update(model, "phone", "x"))[E12]
    intake, holder, transport, base = make(policy=PolicyConfig(max_expert_norm=norm / 2))

    sha = _send(intake, _update(model, "phone", base))

    [ack] = transport.acks("phone")
    assert (ack.status, ack.error, ack.sha) == ("rejected", "PolicyError", sha)
    assert "expert 1:2 norm" in ack.reason
    assert holder.aggregator.num_clients == 0 and intake.store.updates(0) == []
    assert holder.round.refused == {"phone"} and holder.round.accepted == {}


def test_an_update_over_a_norm_bound_is_clipped_when_the_policy_says_clip(make, model):
    one = _update(model, "phone", "x")
    norm = expert_norms(one)[E12]
    intake, holder, transport, base = make(policy=PolicyConfig(
        max_expert_norm=norm / 2, max_update_norm=10 * norm, on_norm_violation="clip"))

    _send(intake, _update(model, "phone", base))

    assert [a.status for a in transport.acks("phone")] == ["accepted"]
    state = model.state()
    new = holder.aggregator.finalize(state)
    key = next(iter(one.deltas))
    torch.testing.assert_close(new[key] - state[key], torch.full_like(state[key], 0.25))
    # the spool keeps the bytes as sent; read back (a restart), the update is clipped again
    [stored] = intake.store.updates(0)
    back = intake.read_back(stored)
    assert expert_norms(back)[E12] == pytest.approx(norm / 2, rel=1e-5)
    assert back.num_examples == 4
    # the participation record keeps the norm as accepted
    [rec] = intake.store.participation(0)
    assert rec["max_expert_norm"] == pytest.approx(norm / 2, rel=1e-5)


# --- a round over the memory transport -------------------------------------------------------
def test_a_rejected_poisoned_update_leaves_the_model_and_the_server_running(tmp_path):
    """b sends 100x a's delta over the bound: refused; the round closes on a's update alone."""
    model = build_hf_model("qwen3-moe", "classification", num_labels=3)
    base_state = {k: v.clone() for k, v in model.state().items()}
    honest = _update(model, "a", "x", value=0.01, run="pol")
    cfg = ServerConfig(run_id="pol", run_dir=str(tmp_path),
                       policy=PolicyConfig(max_update_norm=2 * expert_norms(honest)[E12]),
                       rounds=RoundConfig(rounds=1, deadline_s=30, min_devices=2,
                                          registration_timeout_s=30))
    hub = MemoryHub()
    coordinator = Coordinator(cfg, hub.connect("server"), model, None)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(rows=coordinator.run()))
    thread.start()
    topics = Topics("pol")
    devices = {d: hub.connect(d) for d in ("a", "b")}
    acks: dict[str, list] = {d: [] for d in devices}
    rounds: list = []
    try:
        for d, t in devices.items():
            t.subscribe(topics.ack(d), lambda m, d=d: acks[d].append(json.loads(m.payload)))
            t.subscribe(topics.round(), lambda m: rounds.append(json.loads(m.payload)))
            t.publish(topics.status(d), b'{"state": "online"}', retain=True)
            while not any(a.get("type") == "registered" for a in acks[d]):
                t.publish(topics.register(d), json.dumps({"budget": 2, "report": {
                    "local_examples": 4}}).encode())
                t.run_until(lambda d=d: bool(acks[d]), 1.0)
        t = devices["a"]
        t.run_until(lambda: any(r.get("type") == "round" for r in rounds), 30)
        base_hash = [r for r in rounds if r.get("type") == "round"][0]["model"]["state_hash"]
        for d, value in (("b", 1.0), ("a", 0.01)):
            up = _update(model, d, base_hash, value=value, run="pol")
            blob = encode(up, 0.01)
            sha = hashlib.sha256(blob).hexdigest()
            send_blob(devices[d], topics.update(d, sha), blob)
            devices[d].run_until(lambda d=d, sha=sha: any(a.get("sha") == sha
                                                          for a in acks[d]), 30)
    finally:
        thread.join(60)
        coordinator.close()
    assert not thread.is_alive()
    assert [a["status"] for a in acks["b"] if a.get("sha")] == ["rejected"]
    assert [a["error"] for a in acks["b"] if a.get("sha")] == ["PolicyError"]
    row = result["rows"][-1]
    assert (row["accepted"], row["rejected"]) == (1, 1)
    _, state = Store(tmp_path).latest_checkpoint()
    for key, delta in honest.deltas.items():  # a's delta alone moved the expert
        torch.testing.assert_close(state[key], base_state[key] + delta)
    moved = {k for k in state if not torch.equal(state[k], base_state[k])}
    assert moved == set(honest.deltas)


def test_an_update_read_back_from_the_spool_keeps_its_clipped_example_count(make, model):
    intake, _, transport, base = make(policy=PolicyConfig(on_violation="clip"))
    inflated = dataclasses.replace(_update(model, "phone", base), num_examples=10**9)

    _send(intake, inflated)

    assert [a.status for a in transport.acks("phone")] == ["accepted"]
    [stored] = intake.store.updates(0)
    assert intake.read_back(stored).num_examples == 4  # the cap, not the claim
