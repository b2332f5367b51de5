"""Waiting out a store outage (:mod:`server.store.outage`): the backoff between tries, its
cap, the limit past which the server stops, and what is never retried."""

from __future__ import annotations

import logging
import time

import pytest

from hfedmoe.errors import StoreError, StoreUnavailableError
from server.store.outage import Durable, backoff, until_stored


class FakeTime:
    """A clock that only moves when slept on; records the waits."""

    def __init__(self) -> None:
        self.now = 100.0
        self.waits: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


def failing(times: int, result: str = "written", error: Exception | None = None):
    """A write that raises (StoreError by default) ``times`` times, then returns ``result``;
    its ``calls`` counts the tries."""
    def write() -> str:
        write.calls += 1
        if write.calls <= times:
            raise error or StoreError("database postgresql://kit@db:5432/fleet: gone")
        return result

    write.calls = 0
    return write


def test_the_backoff_doubles_up_to_its_cap():
    waits = backoff(0.5, 10.0)
    assert [next(waits) for _ in range(8)] == [0.5, 1, 2, 4, 8, 10, 10, 10]


def test_a_write_is_tried_again_until_the_store_is_back(caplog):
    t = FakeTime()
    write = failing(3)
    with caplog.at_level(logging.INFO, "hfedmoe.server"):
        assert until_stored("closing round 2", write, limit_s=600, sleep=t.sleep,
                            clock=t.clock) == "written"
    assert write.calls == 4 and t.waits == [0.5, 1.0, 2.0]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 3
    assert all(m.startswith("closing round 2: the store failed") for m in errors)
    assert "postgresql://kit@db:5432/fleet" in errors[0]  # the store's own message
    assert any("the store is back after 3.5s (4 tries)" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)


def test_a_write_that_succeeds_at_once_never_waits(caplog):
    t = FakeTime()
    with caplog.at_level(logging.INFO, "hfedmoe.server"):
        assert until_stored("opening round 0", failing(0), limit_s=600, sleep=t.sleep,
                            clock=t.clock) == "written"
    assert t.waits == [] and caplog.records == []


def test_past_the_limit_the_outage_stops_the_server_with_a_typed_error():
    t = FakeTime()
    write = failing(10**6)
    with pytest.raises(StoreUnavailableError) as err:
        until_stored("closing round 4", write, limit_s=20, sleep=t.sleep, clock=t.clock)
    # 0.5 + 1 + 2 + 4 + 8 = 15.5, then the last wait is cut to reach the limit exactly
    assert t.waits == [0.5, 1.0, 2.0, 4.0, 8.0, 4.5]
    assert write.calls == 7  # the last try is made at the limit
    message = str(err.value)
    assert message.startswith("closing round 4: the store has failed for 20s (7 tries; "
                              "store.outage_limit_s = 20); stopping")
    assert message.endswith("Last error: database postgresql://kit@db:5432/fleet: gone")
    assert isinstance(err.value, StoreError) and err.value.exit_code == 7
    assert isinstance(err.value.__cause__, StoreError)


def test_the_limit_counts_from_the_first_failure_not_from_the_call():
    t = FakeTime()
    calls = []

    def write() -> str:  # the first try itself takes 50 s (a hung statement), then fails
        calls.append(t.now)
        t.now += 50 if len(calls) == 1 else 0
        if len(calls) < 3:
            raise StoreError("gone")
        return "written"

    assert until_stored("opening round 1", write, limit_s=20, sleep=t.sleep,
                        clock=t.clock) == "written"
    assert t.waits == [0.5, 1.0]


def test_no_limit_keeps_trying_with_the_capped_wait():
    t = FakeTime()
    write = failing(200)
    assert until_stored("closing round 0", write, limit_s=0, sleep=t.sleep,
                        clock=t.clock) == "written"
    assert write.calls == 201 and max(t.waits) == 10.0 and t.waits[-1] == 10.0
    assert t.now - 100.0 > 1900  # half an hour of outage, and still waiting it out


def test_an_error_other_than_the_store_is_not_retried():
    t = FakeTime()
    write = failing(1, error=ValueError("a bug, not an outage"))
    with pytest.raises(ValueError, match="a bug"):
        until_stored("closing round 0", write, limit_s=600, sleep=t.sleep, clock=t.clock)
    assert write.calls == 1 and t.waits == []


def test_durable_applies_the_configured_limit():
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        time.sleep(seconds)

    write = failing(10**6)
    with pytest.raises(StoreUnavailableError, match="outage_limit_s = 0.7"):
        Durable(0.7, sleep=sleep)("opening round 3", write)
    assert waits[0] == 0.5 and 0 < waits[1] <= 0.2 + 1e-6 and len(waits) == 2
    assert write.calls == 3
