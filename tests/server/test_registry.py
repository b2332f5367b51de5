"""The device registry on its own: hand-made registration and status messages.

Refusals go to the ``reject`` callable the registry is given (the intake's, in the server);
here it records them, so each test checks exactly which device was refused with which error.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from hfedmoe.modelsync import ModelManifest
from hfedmoe.protocol import DeviceStatus, Registered
from hfedmoe.transport.base import Message
from hfedmoe.transport.topics import Topics
from server.config import RoundConfig, ServerConfig
from server.registry import REGISTRATION_BATCH, DeclaredExamples, Registry
from server.rounds import RoundState
from server.store import open_store

RUN = "reg"
TOPICS = Topics(RUN)


class Recorder:
    """A transport that keeps what is published; ``queued`` messages wait in its inbox."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.queued = 0

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.sent.append((topic, payload))

    def pending(self) -> int:
        return self.queued

    def registered(self) -> list[str]:
        return [t.rsplit("/", 1)[-1] for t, p in self.sent
                if Registered.from_bytes(p) == Registered(RUN)]


@dataclasses.dataclass
class Holder:
    round: RoundState | None = None
    next_round: int = 0
    aggregator: object = None


@pytest.fixture
def make(tmp_path, store_config):
    """A registry over a store (each test runs on SQLite and on PostgreSQL)."""
    made = []

    def build(**cfg_args):
        cfg = ServerConfig(run_id=RUN, run_dir=str(tmp_path), store=store_config, **cfg_args)
        store = open_store(cfg)
        made.append(store)
        transport, refused, holder = Recorder(), [], Holder()
        registry = Registry(cfg,
                            transport, store, holder,
                            lambda d, r, exc: refused.append((d, r, type(exc).__name__)),
                            DeclaredExamples(store), clock=lambda: 123.0)
        return registry, transport, refused, holder

    yield build
    for store in made:
        store.close()


def _register(registry: Registry, device: str, budget: int = 2, **report) -> None:
    registry.on_register(Message(TOPICS.register(device), json.dumps(
        {"budget": budget, "report": report}).encode()))


def _status(registry: Registry, device: str, status: DeviceStatus) -> None:
    registry.on_status(Message(TOPICS.status(device), status.to_bytes()))


def test_a_registration_is_committed_then_acked_and_its_examples_declared(make):
    registry, transport, refused, _ = make()
    assert registry.declared.get() == {}

    _register(registry, "a", budget=3, local_examples=40)

    assert refused == [] and transport.registered() == ["a"]
    assert registry.store.devices()["a"]["budget"] == 3
    assert registry.declared.get() == {"a": 40}


def test_registrations_wait_for_a_quiet_transport_or_a_full_batch(make):
    registry, transport, _, _ = make()
    transport.queued = 5  # more messages are waiting: batch the commit

    _register(registry, "a")
    assert transport.registered() == [] and "a" not in registry.store.devices()
    registry.flush()

    assert transport.registered() == ["a"] and "a" in registry.store.devices()
    for i in range(REGISTRATION_BATCH):
        _register(registry, f"d{i}")
    assert len(transport.registered()) == 1 + REGISTRATION_BATCH


@pytest.mark.parametrize(("device", "body", "cfg", "error"), [
    # local_examples over policy.max_registered_examples: it would weigh the averages
    ("a", {"budget": 2, "report": {"local_examples": 10**12}}, {}, "PolicyError"),
    ("a", {"budget": 2}, {"rounds": RoundConfig(allowed_devices=("b",))}, "UnknownClientError"),
    ("server", {"budget": 2}, {}, "ReservedIdError"),  # the coordinator's own account
    ("a", {"budget": -1}, {}, "ProtocolError"),
])
def test_a_refused_registration_is_rejected_and_not_stored(make, device, body, cfg, error):
    registry, transport, refused, _ = make(**cfg)

    registry.on_register(Message(f"{TOPICS.base}/register/{device}", json.dumps(body).encode()))
    registry.flush()

    assert refused == [(device, None, error)]
    assert transport.registered() == [] and registry.store.devices() == {}


def test_status_is_kept_for_registered_devices_only(make):
    registry, _, _, _ = make()
    _register(registry, "a")

    _status(registry, "a", DeviceStatus("online"))
    _status(registry, "x", DeviceStatus("online"))  # unknown: ignored

    assert list(registry.online()) == ["a"]
    _status(registry, "a", DeviceStatus("offline"))
    assert registry.online() == {}


def test_a_participant_that_is_not_eligible_sits_the_round_out(make):
    registry, _, _, holder = make()
    for d in ("a", "b", "c"):
        _register(registry, d)
    manifest = ModelManifest("0" * 64, {})
    holder.round = RoundState(4, ["a", "b"], 1e12, "0" * 64, manifest, expected=2)

    _status(registry, "a", DeviceStatus("online", eligible=False, reasons=("battery 10%",),
                                        conditions={"battery": 10}, round_idx=4))
    _status(registry, "b", DeviceStatus("online", eligible=True, round_idx=4))
    _status(registry, "c", DeviceStatus("online", eligible=False, reasons=("hot",),
                                        round_idx=4))  # not a participant

    assert holder.round.skipped == {"a": ["battery 10%"]} and holder.round.refused == {"a"}
    assert [(s["client"], s["reasons"]) for s in registry.store.skips(4)] == \
        [("a", ["battery 10%"])]
    assert registry.eligibility["a"] == {"eligible": False, "reasons": ["battery 10%"],
                                         "conditions": {"battery": 10}, "round": 4, "at": 123.0}
    assert set(registry.eligibility) == {"a", "b", "c"}


def test_an_oversized_status_is_dropped_before_any_json_is_parsed(make, monkeypatch):
    import hfedmoe.protocol

    registry, _, _, _ = make()
    _register(registry, "a")
    _status(registry, "a", DeviceStatus("online"))
    parsed: list[int] = []
    real = hfedmoe.protocol.json.loads

    def counting(data, *a, **k):
        parsed.append(len(data))
        return real(data, *a, **k)

    monkeypatch.setattr(hfedmoe.protocol.json, "loads", counting)
    huge = b'{"state": "offline", "pad": "' + b"x" * DeviceStatus.MAX_BYTES + b'"}'
    registry.on_status(Message(TOPICS.status("a"), huge))
    assert parsed == [] and list(registry.online()) == ["a"]  # not parsed, not applied
    _status(registry, "a", DeviceStatus("offline"))  # a status within the limit still counts
    assert parsed and registry.online() == {}


def test_registrations_the_store_cannot_keep_are_not_acked_and_are_taken_later(make,
                                                                                monkeypatch):
    from hfedmoe.errors import StoreError

    registry, transport, _, _ = make()
    real = registry.store.upsert_devices

    def down(rows, *args, **kwargs):
        raise StoreError("database postgresql://db/fleet: connection lost")

    monkeypatch.setattr(registry.store, "upsert_devices", down)
    _register(registry, "a")  # flushed at once (nothing else queued): the store fails
    assert transport.registered() == [] and not registry.known("a")
    monkeypatch.setattr(registry.store, "upsert_devices", real)
    _register(registry, "a")  # the device registers again
    assert transport.registered() == ["a"] and registry.known("a")
