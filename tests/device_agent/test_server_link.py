"""The device's link to the server over the in-memory transport: it registers until answered,
its update goes up as a chunked transfer and the ack's status comes back, an update nobody
acks is given up after the deadline, and a SIGTERM ends any wait."""

from __future__ import annotations

import hashlib
import threading

import pytest

from device_agent.config import AgentConfig
from device_agent.link import AgentStopped, ServerLink
from hfedmoe.protocol import Registered, Registration, UpdateAck
from hfedmoe.transport.chunks import BlobReceiver
from hfedmoe.transport.memory import MemoryHub
from hfedmoe.transport.topics import Topics

CFG = AgentConfig(device_id="dev", run_id="r", ack_timeout_s=0.5)
TOPICS = Topics("r")


class Stepping:
    """A clock at 1000 s that moves ``step`` seconds on every reading."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 1000.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


class FakeServer:
    """Answers registrations, takes updates and acks them as ``status``."""

    def __init__(self, hub: MemoryHub, status: str = "accepted") -> None:
        self.t = hub.connect("server")
        self.status = status
        self.registrations: list[Registration] = []
        self.blobs: list[bytes] = []
        self.t.subscribe(TOPICS.all_register(), self._on_register)
        self.receiver = BlobReceiver(self.t, TOPICS.all_updates(), self._on_update)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: self.t.run_until(
            self.stop.is_set, 30, tick=self.receiver.poll))

    def _on_register(self, message) -> None:
        self.registrations.append(Registration.from_bytes(message.payload))
        self.t.publish(TOPICS.ack("dev"), Registered("r").to_bytes())

    def _on_update(self, prefix: str, blob: bytes) -> None:
        self.blobs.append(blob)
        sha = hashlib.sha256(blob).hexdigest()
        self.t.publish(TOPICS.ack("dev"), UpdateAck(0, sha, self.status).to_bytes())

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(30)


@pytest.mark.parametrize("status", ["accepted", "late-dropped"])
def test_register_then_send_an_update_and_get_its_ack(status):
    hub = MemoryHub()
    # half a second per look at the clock: the first registration goes after the 5 s the
    # link first waits for an answer (to a registration from before a restart)
    clock = Stepping(0.5)
    link = ServerLink(CFG, hub.connect("dev"), clock=clock)
    blob = bytes(range(256)) * 40
    with FakeServer(hub, status) as server:
        link.connect(lambda: Registration(3, {"local_examples": 7}, "dev"))
        assert link.registered
        assert server.registrations == [Registration(3, {"local_examples": 7}, "dev")]
        clock.step = 1e-3  # ack timeouts of 500 readings: time for the server to answer
        got = link.send_update(0, blob, deadline=link.clock() + 30)
    assert got == status
    assert server.blobs == [blob] and link.acks == {}


def test_an_update_nobody_acks_is_given_up_after_the_deadline():
    hub = MemoryHub()
    clock = Stepping(0.1)
    link = ServerLink(CFG, hub.connect("dev"), clock=clock)
    manifests: list = []
    listener = hub.connect("listener")
    listener.subscribe(f"{TOPICS.base}/update/dev/+/manifest", manifests.append)
    listener.wait_subscribed()
    assert link.send_update(0, b"x" * 100, deadline=1000.0) == "unacknowledged"
    # given up 3 ack timeouts after the deadline; the manifest re-announced meanwhile
    assert 1001.5 <= clock() < 1003.0
    listener.pump(timeout=0)
    assert len(manifests) >= 2


def test_a_stop_request_ends_a_wait():
    link = ServerLink(CFG, MemoryHub().connect("dev"), stopped=lambda: True)
    with pytest.raises(AgentStopped):
        link.pump_until(lambda: False, deadline=link.clock() + 30)
