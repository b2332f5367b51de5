"""The control messages (hfedmoe.protocol): every type round-trips through its bytes, and any
malformed payload raises ProtocolError and nothing else; no module above the core reads a
transport payload as a dict; a coordinator fed malformed messages of every kind keeps going."""

from __future__ import annotations

import ast
import json
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hfedmoe.errors import ProtocolError, SchemaError, WireError
from hfedmoe.protocol import (
    MESSAGES,
    CloseRound,
    DeviceStatus,
    Done,
    FetchRequest,
    IngestEvent,
    ModelManifest,
    PartialNotice,
    Registered,
    Registration,
    RoundAnnouncement,
    UpdateAck,
    decode_ack,
    decode_round,
    manifest_hash,
)
from hfedmoe.update import UpdateMeta

ROOT = Path(__file__).resolve().parents[2]

# --- strategies ---------------------------------------------------------------------------------

ids = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=24)
hex64 = st.text("0123456789abcdef", min_size=64, max_size=64)
counts = st.integers(0, 2**40)
finite = st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | finite | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=4),
    max_leaves=12)
objects = st.dictionaries(st.text(max_size=10), json_values, max_size=5)


@st.composite
def manifests(draw: st.DrawFn) -> ModelManifest:
    shards = draw(st.dictionaries(ids, hex64, max_size=4))
    return ModelManifest(manifest_hash(shards), shards)


registrations = st.builds(
    Registration, budget=counts,
    report=objects.filter(lambda r: "local_examples" not in r) | st.builds(
        lambda r, n: {**r, "local_examples": n}, objects, counts),
    device_id=ids)
statuses = st.sampled_from(["online", "offline"]).map(DeviceStatus) | st.builds(
    DeviceStatus, st.sampled_from(["online", "offline"]), st.booleans(),
    st.lists(st.text(max_size=300), max_size=12).map(tuple), objects,
    st.none() | counts, st.booleans(), st.booleans())
fetches = st.builds(FetchRequest, st.booleans(),
                    st.lists(st.integers(0, 10**6), max_size=20).map(tuple))
acks = st.builds(UpdateAck, counts, hex64,
                 st.sampled_from(["accepted", "late-folded", "late-dropped"])) | st.builds(
    UpdateAck, st.none() | counts, st.just("") | hex64, st.just("rejected"), ids,
    st.text(max_size=600))
announcements = st.builds(
    RoundAnnouncement, round_idx=counts, deadline=finite, strategy=ids, method=objects,
    train=objects, participants=st.lists(ids, max_size=6).map(tuple), model=manifests(),
    opened_at=finite, deadline_s=finite, train_time_s=st.none() | finite,
    max_length=st.none() | st.integers(1, 2**20), whole_max_bytes=counts,
    eligibility=objects, budgets=st.dictionaries(ids, counts, max_size=4))
events = st.builds(IngestEvent, st.just("accepted"), ids, counts, nbytes=counts,
                   usage=st.dictionaries(ids, finite, max_size=4),
                   disagreement=st.none() | finite) | st.builds(
    IngestEvent, st.just("late"), ids, counts) | st.builds(
    IngestEvent, st.just("rejected"), ids, st.none() | counts, sha=st.just("") | hex64)
notices = st.builds(PartialNotice, counts, st.text(min_size=1, max_size=60), hex64, counts)

STRATEGIES = {
    Registration: registrations, DeviceStatus: statuses, FetchRequest: fetches,
    Registered: st.builds(Registered, ids), UpdateAck: acks, RoundAnnouncement: announcements,
    Done: st.builds(Done, counts), IngestEvent: events, PartialNotice: notices,
    CloseRound: st.builds(CloseRound, counts),
}
any_message = st.one_of(*STRATEGIES.values())
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def test_every_message_type_has_a_strategy():
    assert set(STRATEGIES) == set(MESSAGES)


# --- round trips --------------------------------------------------------------------------------


@SETTINGS
@given(any_message)
def test_every_message_round_trips(message):
    assert type(message).from_bytes(message.to_bytes()) == message


@SETTINGS
@given(st.one_of(announcements, st.builds(Done, counts)))
def test_the_round_topic_decodes_to_its_message(message):
    assert decode_round(message.to_bytes()) == message


@SETTINGS
@given(st.one_of(acks, st.builds(Registered, ids)))
def test_the_ack_topic_decodes_to_its_message(message):
    assert decode_ack(message.to_bytes()) == message


def test_the_wire_keys_are_the_ones_peers_always_sent():
    shards = {"shared": "a" * 64}
    ann = RoundAnnouncement(3, 100.0, "hfedmoe", {"tau": 0.1}, {"lr": 0.1}, ("a",),
                            ModelManifest(manifest_hash(shards), shards), max_length=32)
    assert list(json.loads(ann.to_bytes())) == [
        "type", "round", "deadline", "opened_at", "deadline_s", "strategy", "method", "train",
        "max_length", "participants", "whole_max_bytes", "eligibility", "budgets", "model"]
    assert json.loads(UpdateAck(None, "", "rejected", "SchemaError", "x").to_bytes()) == {
        "type": "error", "round": None, "sha": "", "status": "rejected",
        "error": "SchemaError", "reason": "x"}
    assert DeviceStatus("offline").to_bytes() == b'{"state": "offline"}'
    assert json.loads(FetchRequest(True).to_bytes()) == {"manifest": True, "chunks": []}
    assert json.loads(IngestEvent("late", "d", 2).to_bytes()) == {
        "type": "late", "round": 2, "device": "d"}
    assert json.loads(CloseRound(4).to_bytes()) == {"type": "close", "round": 4}


def test_the_server_decides_only_its_train_keys():
    shards = {"shared": "a" * 64}
    ann = RoundAnnouncement(0, 1.0, "hfedmoe", {}, {"lr": 0.5, "device": "cuda", "threads": 4},
                            (), ModelManifest(manifest_hash(shards), shards))
    assert ann.server_train() == {"lr": 0.5}


def test_eligibility_reasons_are_bounded_as_the_coordinator_always_kept_them():
    status = DeviceStatus("online", False, tuple(["x" * 500] * 20))
    assert len(status.reasons) == 10 and all(len(r) == 200 for r in status.reasons)
    assert DeviceStatus.from_bytes(json.dumps({
        "state": "online", "eligible": False, "reasons": ["y" * 300] * 11}).encode()
    ).reasons == ("y" * 200,) * 10


# --- malformed payloads -------------------------------------------------------------------------


def _only_protocol_error(decode, data: bytes) -> None:
    try:
        decode(data)
    except ProtocolError:
        pass  # any other exception fails the test


DECODERS = [*(cls.from_bytes for cls in MESSAGES), decode_ack, decode_round]


@SETTINGS
@given(st.binary(max_size=200), st.sampled_from(DECODERS))
def test_arbitrary_bytes_raise_protocol_error_only(data, decode):
    _only_protocol_error(decode, data)


@SETTINGS
@given(json_values.filter(lambda v: not isinstance(v, dict)), st.sampled_from(DECODERS))
def test_json_that_is_not_an_object_is_refused(value, decode):
    with pytest.raises(ProtocolError):
        decode(json.dumps(value).encode())


@SETTINGS
@given(any_message, st.data())
def test_a_field_replaced_by_any_json_value_is_read_or_refused(message, data):
    raw = json.loads(message.to_bytes())
    key = data.draw(st.sampled_from(sorted(raw)))
    raw[key] = data.draw(json_values)
    _only_protocol_error(type(message).from_bytes, json.dumps(raw).encode())


_HASH = manifest_hash({"shared": "a" * 64})
VALID = {
    Registration: {"device_id": "a", "budget": 2, "report": {"local_examples": 4}},
    DeviceStatus: {"state": "online", "eligible": False, "reasons": ["battery"],
                   "conditions": {}, "round": 1, "during_round": False, "sending": False},
    FetchRequest: {"manifest": True, "chunks": [0, 1]},
    Registered: {"type": "registered", "run_id": "r"},
    UpdateAck: {"type": "ack", "round": 1, "sha": "b" * 64, "status": "accepted"},
    RoundAnnouncement: {"type": "round", "round": 0, "deadline": 10.0, "opened_at": 1.0,
                        "deadline_s": 9.0, "strategy": "hfedmoe", "method": {}, "train": {},
                        "max_length": 16, "participants": ["a"], "whole_max_bytes": 0,
                        "eligibility": {}, "budgets": {"a": 2},
                        "model": {"state_hash": _HASH, "shards": {"shared": "a" * 64}}},
    Done: {"type": "done", "rounds": 3},
    IngestEvent: {"type": "accepted", "round": 0, "device": "a", "bytes": 10,
                  "usage": {"1.2": 0.5}, "disagreement": 0.1},
    PartialNotice: {"round": 0, "path": "partials/r0/w0.safetensors", "sha256": "c" * 64,
                    "clients": 1},
    CloseRound: {"type": "close", "round": 0},
}
WRONG = {
    Registration: {"budget": ["2", 1.5, None, True, -1, 2**64], "report": [[], "x", None],
                   "device_id": [1, None, "x" * 300]},
    DeviceStatus: {"state": ["busy", 1, None], "eligible": [1, "no", None],
                   "reasons": ["x", [1], {}], "conditions": [[], "x"],
                   "round": ["1", -1, 1.0, True], "during_round": [1, None], "sending": ["x"]},
    FetchRequest: {"manifest": [1, "yes", None], "chunks": ["0", [-1], [1.5], [True], {}]},
    Registered: {"type": ["ack", None], "run_id": [1, None]},
    UpdateAck: {"type": ["registered", "error", 1], "status": ["ok", "rejected", 1],
                "round": ["1", -1, None], "sha": [1, None, ""]},
    RoundAnnouncement: {"type": ["done"], "round": ["0", -1, 0.5], "deadline": ["x", None, True],
                        "strategy": [1, None], "method": [[], "x"], "train": [None],
                        "participants": ["a", [1], {}], "budgets": [{"a": -1}, {"a": "2"}],
                        "model": [{}, {"state_hash": "x", "shards": {}}, None],
                        "max_length": [0, "16"], "whole_max_bytes": [-1, 1.5],
                        "opened_at": ["x"], "eligibility": [[]]},
    Done: {"type": ["round"], "rounds": [-1, "3", None]},
    IngestEvent: {"type": ["x", None], "device": [1, None], "round": [None, "0", -1],
                  "bytes": [-1, "10"], "usage": [[], {"1.2": "x"}], "disagreement": ["x"]},
    PartialNotice: {"round": [-1, None], "path": [1, ""], "sha256": ["abc", 1, None],
                    "clients": [-1, "1"]},
    CloseRound: {"type": ["open", None], "round": [None, "1", -1]},
}
REQUIRED = {
    Registration: ["budget"], DeviceStatus: ["state"], FetchRequest: [],
    Registered: ["type", "run_id"], UpdateAck: ["type", "round", "sha", "status"],
    RoundAnnouncement: ["type", "round", "deadline", "strategy", "method", "train",
                        "participants", "model"],
    Done: ["type", "rounds"], IngestEvent: ["type", "device", "round"],
    PartialNotice: ["round", "path", "sha256"], CloseRound: ["type", "round"],
}


@pytest.mark.parametrize("cls", MESSAGES, ids=lambda c: c.__name__)
def test_the_valid_example_is_read(cls):
    message = cls.from_bytes(json.dumps(VALID[cls]).encode())
    assert json.loads(message.to_bytes()) == VALID[cls]


@pytest.mark.parametrize(("cls", "key", "bad"), [
    (cls, key, bad) for cls, fields in WRONG.items() for key, values in fields.items()
    for bad in values], ids=lambda v: getattr(v, "__name__", repr(v)[:12]))
def test_wrong_types_and_out_of_range_values_are_refused(cls, key, bad):
    with pytest.raises(ProtocolError):
        cls.from_bytes(json.dumps({**VALID[cls], key: bad}).encode())


@pytest.mark.parametrize(("cls", "key"), [
    (cls, key) for cls, keys in REQUIRED.items() for key in keys],
    ids=lambda v: getattr(v, "__name__", v))
def test_missing_fields_are_refused(cls, key):
    raw = {k: v for k, v in VALID[cls].items() if k != key}
    with pytest.raises(ProtocolError, match=key):
        cls.from_bytes(json.dumps(raw).encode())


@pytest.mark.parametrize("cls", MESSAGES, ids=lambda c: c.__name__)
def test_oversized_payloads_are_refused_before_parsing(cls):
    valid = json.dumps(VALID[cls]).encode()
    assert cls.from_bytes(valid)
    with pytest.raises(ProtocolError, match="bytes >"):
        cls.from_bytes(b" " * cls.MAX_BYTES + valid)


def test_unknown_fields_are_ignored_for_newer_peers():
    raw = {**VALID[Registration], "firmware": "2.1"}
    assert Registration.from_bytes(json.dumps(raw).encode()).budget == 2


def test_protocol_error_is_a_schema_error_of_the_wire_family():
    assert issubclass(ProtocolError, SchemaError) and issubclass(ProtocolError, WireError)
    assert ProtocolError.exit_code == WireError.exit_code


# --- the update's meta ---------------------------------------------------------------------------


@SETTINGS
@given(objects)
def test_update_meta_gives_back_the_header_object_it_was_read_from(raw):
    assert UpdateMeta.from_dict(raw).to_dict() == raw


def test_update_meta_types_what_the_kit_reads_and_bounds_what_the_server_records():
    meta = UpdateMeta.from_dict({"steps": 3, "selected": "many", "ib_vs_importance": True,
                                 "latency": {"step_s": 0.1}, "upload_prev": {"x": "y" * 600},
                                 "plan": {"limit": "memory"}, "budget_limit": "time"})
    assert meta.steps == 3 and meta.selected is None and meta.ib_vs_importance is None
    assert meta.extra == {"selected": "many", "ib_vs_importance": True}
    assert meta.limit == "memory" and meta.budget_limit == "time"
    assert meta.recorded_latency() == {"step_s": 0.1}  # the previous upload is too large
    big = UpdateMeta(latency={"x": "y" * 5000})
    assert big.recorded_latency() is None and big.to_dict() == {"latency": {"x": "y" * 5000}}


# --- no module reads a control message as a dict -----------------------------------------------


def payload_reads(source: str) -> list[int]:
    """Lines where ``json.loads`` is called on something named ``payload`` (a transport
    message's bytes): a control message read as a dict instead of through its type."""

    def names(node: ast.AST) -> set[str]:
        return {n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(node)
                if isinstance(n, (ast.Name, ast.Attribute))}

    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr == "loads" and isinstance(node.func.value, ast.Name) \
                and node.func.value.id == "json" \
                and any("payload" in n for arg in node.args for n in names(arg)):
            lines.append(node.lineno)
    return lines


def test_the_scan_flags_a_control_message_read_as_a_dict():
    injected = ("import json\n\ndef _on_round(self, message):\n"
                "    body = json.loads(message.payload)\n    return body['round']\n")
    assert payload_reads(injected) == [4]
    assert payload_reads("import json\nstate = json.loads(path.read_text())\n") == []


def test_no_module_above_the_core_reads_a_transport_payload_as_json():
    found = {str(p.relative_to(ROOT)): lines
             for pkg in ("server", "device_agent", "lab")
             for p in sorted((ROOT / pkg).rglob("*.py"))
             if (lines := payload_reads(p.read_text()))}
    assert found == {}


# --- a coordinator fed malformed messages -------------------------------------------------------

MALFORMED = [b"", b"\xff\xfe", b"not json", b"[1, 2]", b"null", b'{"a": ' * 5000,
             b" " * (4 << 20) + b"{}"]


def test_a_coordinator_survives_malformed_messages_of_every_kind(tmp_path):
    """Registration, status, fetch and the ingest messages, each malformed many ways: the
    coordinator keeps running, its global model does not move, and a good registration
    afterwards is still taken."""
    import torch

    from hfedmoe.models.hf import build_hf_model
    from hfedmoe.transport.config import TransportConfig
    from hfedmoe.transport.memory import MemoryHub
    from hfedmoe.transport.topics import Topics
    from server.config import IngestConfig, RoundConfig, ServerConfig
    from server.coordinator import Coordinator
    from server.store import Store

    model = build_hf_model("qwen3-moe", "classification", num_labels=3)
    before = {k: v.clone() for k, v in model.state().items()}
    cfg = ServerConfig(run_id="bad", run_dir=str(tmp_path), ingest=IngestConfig(workers=1),
                       transport=TransportConfig(protocol="5"),  # workers share by MQTT 5
                       rounds=RoundConfig(rounds=1, deadline_s=120, min_devices=1,
                                          registration_timeout_s=30))
    hub = MemoryHub()
    coordinator = Coordinator(cfg, hub.connect("server"), model, None)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(rows=coordinator.run()))
    thread.start()
    topics = Topics("bad")
    dev = hub.connect("a")
    acks: list = []
    rounds: list = []
    dev.subscribe(topics.ack("a"), lambda m: acks.append(decode_ack(m.payload)))
    dev.subscribe(topics.round(), lambda m: rounds.append(decode_round(m.payload)))
    try:
        dev.publish(topics.register("a"), Registration(2, {}, "a").to_bytes())
        assert dev.run_until(lambda: any(isinstance(a, Registered) for a in acks), 30)
        assert dev.run_until(lambda: bool(rounds), 30)
        sha = next(iter(rounds[0].model.shards.values()))
        bad = {
            topics.register("a"): [*MALFORMED, b'{"budget": -1}', b'{"budget": "2"}',
                                   b'{"budget": 2, "report": []}',
                                   b'{"budget": 2, "report": {"local_examples": "many"}}'],
            topics.status("a"): [*MALFORMED, b'{"state": "offline", "eligible": "no"}',
                                 b'{"state": "offline", "eligible": false, "round": -1}'],
            topics.model_fetch("a", sha): [*MALFORMED, b'{"chunks": [-1]}',
                                          b'{"manifest": "yes"}'],
            topics.ingest_event("w0"): [*MALFORMED, b'{"type": "accepted", "device": "a"}',
                                        b'{"type": "accepted", "device": "a", "round": 0, '
                                        b'"bytes": -5}'],
            topics.ingest_partial("w0"): [*MALFORMED, b'{"round": 0, "path": "/etc/passwd"}'],
            topics.ingest_status("w0"): [*MALFORMED, b'{"state": 3}'],
        }
        for topic, payloads in bad.items():
            for payload in payloads:
                dev.publish(topic, payload)
        rejected = len(bad[topics.register("a")])
        assert dev.run_until(lambda: sum(isinstance(a, UpdateAck) and a.rejected
                                         for a in acks) >= rejected, 30)
        assert all(a.error == "ProtocolError" for a in acks if isinstance(a, UpdateAck))
        assert Store(tmp_path).devices()["a"]["status"] == "online"  # no bad status took
        assert coordinator.round is not None and not coordinator.round.accepted
        hub.connect("b").publish(topics.register("b"), Registration(3, {}, "b").to_bytes())
        deadline = time.monotonic() + 30
        while "b" not in Store(tmp_path).devices() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert Store(tmp_path).devices()["b"]["budget"] == 3
        dev.publish(topics.status("a"), DeviceStatus("offline").to_bytes())  # the round ends
    finally:
        thread.join(60)
        coordinator.close()
    assert not thread.is_alive() and result["rows"][-1]["accepted"] == 0
    assert all(torch.equal(v, before[k]) for k, v in coordinator.global_state.items())


def test_the_announced_routing_prior_round_trips_and_bad_priors_are_protocol_errors():
    shards = {"shared": "a" * 64}
    ann = RoundAnnouncement(2, 1.0, "hfedmoe", {}, {}, ("a",),
                            ModelManifest(manifest_hash(shards), shards),
                            prior={"0:3": 0.25, "5:0": 0.0})
    back = RoundAnnouncement.from_bytes(ann.to_bytes())
    assert back.prior == {"0:3": 0.25, "5:0": 0.0}
    raw = json.loads(ann.to_bytes())
    for bad in ({"0:3": 1.5}, {"0:3": -0.1}, {"gate": 0.2}, {"0:3": "x"}, {"0:3": None},
                {"-1:2": 0.1}, ["0:3"]):
        with pytest.raises(ProtocolError, match="prior"):
            RoundAnnouncement.from_bytes(json.dumps({**raw, "prior": bad}).encode())
