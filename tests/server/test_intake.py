"""The update intake on its own: hand-made updates into a hand-made open round.

Each test sends one encoded update (or a worker's event) to an :class:`server.intake.Intake`
over a transport that only records what is published, and checks the exact outcome: the ack,
the round's counts, the spool, the rejection row and the event told to ``notify``.
"""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch

from hfedmoe.aggregator import Aggregator
from hfedmoe.models.hf import build_hf_model
from hfedmoe.modelsync import build_shards
from hfedmoe.names import ExpertId
from hfedmoe.protocol import IngestEvent, UpdateAck
from hfedmoe.strategies import get_strategy
from hfedmoe.transport.topics import Topics
from hfedmoe.update import SparseUpdate
from hfedmoe.wire import encode
from server.config import PolicyConfig, RoundConfig, ServerConfig
from server.intake import Intake
from server.registry import DeclaredExamples
from server.rounds import RoundState
from server.store import open_store

RUN = "intake"
E12, E13 = ExpertId(1, 2), ExpertId(1, 3)


class Recorder:
    """A transport that keeps what is published (the intake only publishes acks)."""

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
def make(tmp_path, model, store_config):
    """An intake over a store (each test runs on SQLite and on PostgreSQL) where a (budget 1)
    and b (budget 2) registered with 4 local examples each, round ``open_idx`` open with
    participants a and b."""
    made = []

    def build(open_idx: int | None = 0, **cfg_args):
        cfg_args.setdefault("store", store_config)
        cfg = ServerConfig(run_id=RUN, run_dir=str(tmp_path), **cfg_args)
        store = open_store(cfg)
        store.upsert_devices([("a", {"local_examples": 4}, 1), ("b", {"local_examples": 4}, 2),
                              ("c", {"local_examples": 4}, 2)])
        strategy = get_strategy(cfg.method.strategy, cfg.method)
        manifest, _ = build_shards(model.state())
        r = None if open_idx is None else RoundState(open_idx, ["a", "b"], 1e12,
                                                     manifest.state_hash, manifest, expected=2)
        holder = Holder(r, 0 if open_idx is None else open_idx, strategy.make_aggregator())
        transport, events = Recorder(), []
        intake = Intake(cfg, transport, store, model.state(), holder, strategy=strategy,
                        declared=DeclaredExamples(store), notify=events.append)
        made.append(store)
        return intake, holder, transport, events, manifest.state_hash

    yield build
    for store in made:
        store.close()


def _blob(model, device: str, round_idx: int, base_hash: str, experts=(E12,),
          num_examples: int = 4) -> tuple[bytes, str]:
    delta = {k: torch.full_like(v, 0.5) for e in experts for k, v in model.expert_state(e).items()}
    blob = encode(SparseUpdate(RUN, round_idx, device, num_examples, delta,
                               usage={e: 0.5 for e in experts},
                               importance={e: 0.5 for e in experts},
                               routed=frozenset(experts), updated=frozenset(experts),
                               base_model_hash=base_hash), 0.01)
    return blob, hashlib.sha256(blob).hexdigest()


def _send(intake: Intake, device: str, blob: bytes, sha: str) -> None:
    intake.receive(Topics(RUN).update(device, sha).prefix, blob)


def test_an_update_for_the_open_round_is_spooled_counted_and_acked(make, model):
    intake, holder, transport, events, base = make()
    blob, sha = _blob(model, "a", 0, base)

    _send(intake, "a", blob, sha)

    assert transport.acks("a") == [UpdateAck(0, sha, "accepted")]
    r = holder.round
    assert r.accepted == {"a": len(blob)} and r.usage == {"a": {E12: 0.5}}
    assert (r.rejected, r.late, r.refused) == (0, 0, set())
    assert set(holder.aggregator.summaries) == {"a"}
    assert intake.store.update(0, "a").num_bytes == len(blob)
    assert [p["client"] for p in intake.store.participation(0)] == ["a"]
    assert [(e.kind, e.device, e.round_idx, e.nbytes) for e in events] == \
        [("accepted", "a", 0, len(blob))]


def test_a_resend_of_an_acked_update_is_acked_again_and_counted_once(make, model):
    intake, holder, transport, _, base = make()
    blob, sha = _blob(model, "a", 0, base)

    _send(intake, "a", blob, sha)
    _send(intake, "a", blob, sha)

    assert [a.status for a in transport.acks("a")] == ["accepted", "accepted"]
    assert holder.aggregator.num_clients == 1 and len(intake.store.updates(0)) == 1


@pytest.mark.parametrize(("device", "change", "error", "refused"), [
    # not registered: refused before its round is even read
    ("x", {}, "UnknownClientError", False),
    # registered but not a participant of the open round
    ("c", {}, "UnknownClientError", True),
    # a's registered budget is 1 expert
    ("a", {"experts": (E12, E13)}, "BudgetExceededError", True),
    ("b", {"base_hash": "0" * 64}, "MismatchError", True),
    ("b", {"round_idx": 1}, "MismatchError", False),  # a round that is not open
    # declared 4 examples at registration: the policy caps a claim of 1e9
    ("b", {"num_examples": 10**9}, "PolicyError", True),
])
def test_a_refused_update_is_rejected_with_its_typed_error(make, model, device, change, error,
                                                           refused):
    intake, holder, transport, events, base = make()
    args = {"round_idx": 0, "base_hash": base, **change}
    blob, sha = _blob(model, device, **args)

    _send(intake, device, blob, sha)

    [ack] = transport.acks(device)
    assert (ack.status, ack.error, ack.sha) == ("rejected", error, sha)
    r = holder.round
    assert r.rejected == 1 and r.accepted == {}
    assert r.refused == ({device} if refused else set())
    assert holder.aggregator.num_clients == 0 and intake.store.updates(0) == []
    assert [x["error"] for x in intake.store.rejections()] == [error]
    assert [(e.kind, e.device, e.sha) for e in events] == [("rejected", device, sha)]


def test_an_inflated_example_count_is_clipped_when_the_policy_says_clip(make, model):
    intake, holder, transport, _, base = make(policy=PolicyConfig(on_violation="clip"))
    blob, sha = _blob(model, "b", 0, base, num_examples=10**9)

    _send(intake, "b", blob, sha)

    assert [a.status for a in transport.acks("b")] == ["accepted"]
    assert intake.store.update(0, "b").num_examples == 4


def test_a_late_update_is_dropped_by_default(make, model):
    intake, holder, transport, events, base = make(open_idx=1)
    blob, sha = _blob(model, "a", 0, base)

    _send(intake, "a", blob, sha)

    assert transport.acks("a") == [UpdateAck(0, sha, "late-dropped")]
    assert (holder.round.late, holder.round.accepted, holder.aggregator.num_clients) == (1, {}, 0)
    assert intake.store.updates(1) == [] and intake.store.updates(0) == []
    assert [(e.kind, e.round_idx) for e in events] == [("late", 0)]


def test_a_late_update_is_folded_into_the_open_round_under_its_own_key(make, model):
    intake, holder, transport, _, base = make(open_idx=1, rounds=RoundConfig(late_policy="fold"))
    blob, sha = _blob(model, "a", 0, base)

    _send(intake, "a", blob, sha)

    assert transport.acks("a") == [UpdateAck(0, sha, "late-folded")]
    assert set(holder.aggregator.summaries) == {"a~r0"}
    [stored] = intake.store.updates(1)
    assert (stored.client_id, stored.late) == ("a~r0", True)
    assert intake.read_back(stored).client_id == "a~r0"  # the key survives a restart


def test_between_rounds_an_update_for_the_next_round_is_refused(make, model):
    intake, _, transport, _, base = make(open_idx=None)
    blob, sha = _blob(model, "a", 0, base)

    _send(intake, "a", blob, sha)

    assert [(a.status, a.error) for a in transport.acks("a")] == [("rejected", "MismatchError")]


def test_a_workers_events_count_in_the_open_round(make):
    intake, holder, _, _, _ = make()

    intake.count(IngestEvent("accepted", "a", 0, nbytes=100, usage={"1:2": 0.25},
                             disagreement=0.5))
    intake.count(IngestEvent("accepted", "b", 7, nbytes=100))  # another round: not counted
    intake.count(IngestEvent("rejected", "b", 0, sha="f" * 64))
    intake.count(IngestEvent("late", "c", 0))

    r = holder.round
    assert r.accepted == {"a": 100} and r.usage == {"a": {E12: 0.25}}
    assert r.disagreement == {"a": 0.5}
    assert (r.rejected, r.refused, r.late) == (1, {"b"}, 1)
