"""The coordinator through a store outage while a round opens or closes (in-memory transport,
SQLite whose round and checkpoint writes are made to fail): the writes are waited out, the
aggregate is computed once, no round is skipped or repeated, and a store that stays away past
``store.outage_limit_s`` stops the run with StoreUnavailableError."""

from __future__ import annotations

import hashlib
import json
import threading
import time

import pytest
import torch

from hfedmoe.errors import StoreError, StoreUnavailableError
from hfedmoe.models.hf import build_hf_model
from hfedmoe.names import ExpertId
from hfedmoe.transport.chunks import send_blob
from hfedmoe.transport.memory import MemoryHub
from hfedmoe.transport.topics import Topics
from hfedmoe.update import SparseUpdate
from hfedmoe.wire import encode
from server.config import RoundConfig, ServerConfig, StoreConfig
from server.coordinator import Coordinator
from server.store import Store

RUN = "outage"
E = ExpertId(1, 2)
KEY = "layers.1.experts.2.w_in"


def fail_first(store, name: str, times: int, when=lambda *a: True) -> list[tuple]:
    """Make ``store.name`` raise StoreError on its first ``times`` calls for which
    ``when(*args)`` holds; the returned list records the calls that went through."""
    real = getattr(store, name)
    through: list[tuple] = []
    failed = [0]

    def flaky(*args, **kwargs):
        if when(*args) and failed[0] < times:
            failed[0] += 1
            raise StoreError(f"database postgresql://kit@db:5432/fleet: {name} lost")
        through.append(args)
        return real(*args, **kwargs)

    setattr(store, name, flaky)
    return through


class Devices:
    """Two devices on the hub: registered, and able to send a round's update."""

    def __init__(self, hub: MemoryHub, model) -> None:
        self.model = model
        self.topics = Topics(RUN)
        self.t = {d: hub.connect(d) for d in ("a", "b")}
        self.acks: dict[str, list] = {d: [] for d in self.t}
        self.rounds: list = []
        for d, t in self.t.items():
            t.subscribe(self.topics.ack(d), lambda m, d=d: self.acks[d].append(
                json.loads(m.payload)))
            if d == "a":  # what one device is told
                t.subscribe(self.topics.round(),
                            lambda m: self.rounds.append(json.loads(m.payload)))
            t.publish(self.topics.status(d), b'{"state": "online"}', retain=True)
            while not any(a.get("type") == "registered" for a in self.acks[d]):
                t.publish(self.topics.register(d), json.dumps({"budget": 2,
                                                               "report": {}}).encode())
                t.run_until(lambda d=d: bool(self.acks[d]), 1.0)

    def announcement(self, round_idx: int, timeout: float = 60) -> dict:
        def got() -> list:
            return [r for r in self.rounds if r.get("round") == round_idx]

        self.t["a"].run_until(lambda: bool(got()), timeout)
        assert got(), f"round {round_idx} was not announced"
        return got()[-1]

    def send(self, ann: dict, value: float) -> None:
        """Both devices send ``value`` on every weight of expert E; each waits for its ack."""
        delta = {k: torch.full_like(v, value) for k, v in self.model.expert_state(E).items()}
        for d, t in self.t.items():
            up = SparseUpdate(RUN, ann["round"], d, 4, delta, usage={E: 0.5},
                              importance={E: 0.5}, routed=frozenset({E}),
                              updated=frozenset({E}), base_model_hash=ann["model"]["state_hash"])
            blob = encode(up, 0.01)
            sha = hashlib.sha256(blob).hexdigest()
            send_blob(t, self.topics.update(d, sha), blob)
            t.run_until(lambda d=d, sha=sha: any(a.get("sha") == sha for a in self.acks[d]), 30)
            assert [a["status"] for a in self.acks[d] if a.get("sha") == sha] == ["accepted"]


def start(tmp_path, rounds: int, limit_s: float = 600.0):
    model = build_hf_model("qwen3-moe", "classification", num_labels=3)
    cfg = ServerConfig(run_id=RUN, run_dir=str(tmp_path), store=StoreConfig(
        outage_limit_s=limit_s), rounds=RoundConfig(rounds=rounds, deadline_s=60, min_devices=2,
                                                    registration_timeout_s=30))
    hub = MemoryHub()
    skew = [0.0]  # the waits happen on the coordinator's clock, not the test's
    coordinator = Coordinator(cfg, hub.connect("server"), model, None,
                              clock=lambda: time.time() + skew[0])
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        skew[0] += seconds
        time.sleep(0.02)

    coordinator.durably.sleep = sleep
    return model, hub, coordinator, waits


def run_in_thread(coordinator) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run() -> None:
        try:
            result["rows"] = coordinator.run()
        except Exception as exc:  # noqa: BLE001 - handed to the test
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def test_an_outage_while_rounds_close_and_open_is_waited_out_with_nothing_done_twice(tmp_path):
    model, hub, coordinator, waits = start(tmp_path, rounds=2)
    store = coordinator.store
    checkpoints = fail_first(store, "save_checkpoint", 3)  # round 0's close
    opened = fail_first(store, "open_round", 2, when=lambda r, *a: r == 1)  # round 1's open
    aggregated: list[int] = []
    real_aggregate = coordinator._aggregate
    coordinator._aggregate = lambda r: (aggregated.append(r.round_idx), real_aggregate(r))[1]
    thread, result = run_in_thread(coordinator)
    try:
        devices = Devices(hub, model)
        devices.send(devices.announcement(0), 0.5)
        ann1 = devices.announcement(1)
        # the 1.5 s outage while it opened did not eat into its 60 s
        assert ann1["deadline_s"] > 59
        devices.send(ann1, 0.25)
    finally:
        thread.join(60)
        coordinator.close()
    assert not thread.is_alive() and "error" not in result
    assert waits == [0.5, 1.0, 2.0, 0.5, 1.0]  # three failed checkpoints, two failed opens
    assert aggregated == [0, 1]  # each round folded once, the retries notwithstanding
    assert [c[0] for c in checkpoints] == [0, 1] and [o[0] for o in opened] == [0, 1]
    assert [r["round"] for r in result["rows"] if r.get("phase") == "round"] == [0, 1]
    assert [r["accepted"] for r in result["rows"] if r.get("phase") == "round"] == [2, 2]
    assert len([r for r in devices.rounds if r.get("round") == 1]) == 1  # announced once
    reopened = Store(tmp_path)
    assert reopened.last_round() == 1
    assert [reopened.round_info(i)["state"] for i in (0, 1)] == ["done", "done"]
    done, state = reopened.latest_checkpoint()
    reopened.close()
    base = build_hf_model("qwen3-moe", "classification", num_labels=3).state()[KEY]
    assert done == 1
    torch.testing.assert_close(state[KEY], base + 0.75)  # 0.5 then 0.25, each folded once


def test_a_store_that_stays_away_past_the_limit_stops_the_run(tmp_path):
    model, hub, coordinator, waits = start(tmp_path, rounds=1, limit_s=0.3)
    opened = fail_first(coordinator.store, "open_round", 10**6)
    thread, result = run_in_thread(coordinator)
    try:
        devices = Devices(hub, model)
    finally:
        thread.join(60)
        coordinator.close()
    assert not thread.is_alive()
    error = result.get("error")
    assert isinstance(error, StoreUnavailableError), result
    assert str(error).startswith("opening round 0: the store has failed for 0s")
    assert "store.outage_limit_s = 0.3" in str(error)
    assert "postgresql://kit@db:5432/fleet" in str(error)
    assert opened == [] and len(waits) >= 1  # tried, waited, never written
    assert not [r for r in devices.rounds if r.get("type") == "round"]  # never announced
    assert Store(tmp_path).last_round() is None


@pytest.mark.parametrize("limit", [-1, 7 * 86400 + 1])
def test_the_outage_limit_is_validated(limit):
    from hfedmoe.errors import ConfigError

    with pytest.raises(ConfigError, match="store.outage_limit_s"):
        StoreConfig(outage_limit_s=limit)
