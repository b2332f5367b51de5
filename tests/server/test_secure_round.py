"""The live secure round's server side over the in-memory transport: messages routed by phase,
plain updates refused, phases closed by their deadlines, and the announcement's table."""

from __future__ import annotations

import hashlib

import pytest

from device_agent.secagg import SecAggClient
from device_agent.secure_session import announced_secagg
from hfedmoe.aggregation import AggregationRule
from hfedmoe.errors import ConfigError, SecAggError
from hfedmoe.secagg import SecAggConfig
from hfedmoe.secagg_messages import Roster
from hfedmoe.transport.memory import MemoryHub
from hfedmoe.transport.topics import Topics
from server.config import IngestConfig, ServerConfig
from server.secure_round import SecureRounds
from tests.lab.secagg_fixtures import global_state, ten_clients

TOPICS = Topics("r")
CFG = SecAggConfig(enabled=True, min_contributors=3, phase_timeout_s=5.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _prefix(device: str, blob: bytes) -> str:
    return TOPICS.update(device, hashlib.sha256(blob).hexdigest()).prefix


def setup():
    hub, clock, rejected = MemoryHub(), Clock(), []
    server_t = hub.connect("server")
    seen: dict[str, list[bytes]] = {}
    watcher = hub.connect("watch")
    watcher.subscribe(TOPICS.base + "/ack/+/secagg",
                      lambda m: seen.setdefault(m.topic.split("/")[-2], []).append(m.payload))
    rounds = SecureRounds(CFG, AggregationRule(), server_t, TOPICS, clock,
                          lambda d, r, exc, sha: rejected.append((d, type(exc).__name__)))
    state = global_state()
    updates = ten_clients(state)
    table = rounds.open(0, [u.client_id for u in updates], clock.now + 60, state)
    return hub, clock, rejected, seen, rounds, state, updates, table, watcher


def test_announced_table_round_trips_and_a_bad_one_is_refused() -> None:
    *_, table, _ = setup()
    cfg, key = announced_secagg(table)

    assert cfg == CFG and len(key) == 16
    with pytest.raises(SecAggError):
        announced_secagg({**table, "round_key": "zz"})
    with pytest.raises(SecAggError):
        announced_secagg({**table, "min_contributors": 1})


def test_plain_update_and_wrong_phase_messages_are_rejected_and_phases_close() -> None:
    hub, clock, rejected, seen, rounds, state, updates, table, watcher = setup()
    cfg, key = announced_secagg(table)
    receive = rounds.receiver(lambda prefix, blob: pytest.fail("plain intake reached"))
    clients = {u.client_id: SecAggClient(u, AggregationRule(), cfg, key) for u in updates}
    receive(_prefix("c0", b"plain"), b"plain update bytes")  # not a secure message
    ads = {c: x.advertise().to_bytes() for c, x in clients.items()}
    receive(_prefix("c1", ads["c2"]), ads["c2"])  # names another device
    for c in ("c1", "c2", "c3", "c4", "c5", "c6", "c7", "c8", "c9"):
        receive(_prefix(c, ads[c]), ads[c])
    assert rejected == [("c0", "SecAggError"), ("c1", "SecAggError")]

    assert not rounds.finished()  # c0 has until the deadline
    clock.now += 61
    assert not rounds.finished()  # advertise closed: the roster went out
    watcher.pump(timeout=0)
    roster = Roster.from_bytes(seen["c1"][-1])
    assert [c.client for c in roster.clients] == [f"c{i}" for i in range(1, 10)]
    share = clients["c1"].share_keys(roster).to_bytes()
    receive(_prefix("c0", ads["c0"]), ads["c0"])  # too late, and it sent a plain update
    assert rejected[-1] == ("c0", "SecAggError")
    receive(_prefix("c1", share), share)
    done = []
    for _ in range(3):  # nobody else shares, c1 masks nothing: the phases time out
        clock.now += 6
        done.append(rounds.finished())
    assert done == [False, True, True]  # no survivor: nothing to unmask, done
    new_state = rounds.finalize(state, {})
    assert all(new_state[k] is state[k] for k in state)  # nothing could be revealed
    assert rounds.row()["secagg"]["revealed_units"] == 0


def test_secure_rounds_refuse_sharded_ingestion() -> None:
    with pytest.raises(ConfigError, match="ingest.workers"):
        ServerConfig(secagg=CFG, ingest=IngestConfig(workers=2))
