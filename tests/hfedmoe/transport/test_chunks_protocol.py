"""Chunked transfer protocol, the same tests on the in-memory hub, amqtt and Mosquitto."""

from __future__ import annotations

import json
import os
import random
import uuid

import pytest

from hfedmoe.transport.broker import EmbeddedBroker
from hfedmoe.transport.chunks import BlobReceiver, ChunkSender, send_blob, sha256
from hfedmoe.transport.config import TransportConfig
from hfedmoe.transport.memory import MemoryHub
from hfedmoe.transport.mqtt import MqttTransport
from hfedmoe.transport.topics import Topics
from tests.hfedmoe.transport.conftest import ManualClock, make_mosquitto

pytestmark = pytest.mark.timeout(60)


class Session:
    """A server receiving updates from device ``dev1`` on one backend."""

    def __init__(self, server, device, clock: ManualClock | None = None, **kw) -> None:
        self.topics = Topics(f"run-{uuid.uuid4().hex[:8]}")
        self.server, self.device = server, device
        self.clock = clock or ManualClock()
        self.got: list[tuple[str, bytes]] = []
        self.errors: list = []
        self.recv = BlobReceiver(server, self.topics.all_updates(),
                                 lambda p, b: self.got.append((p, b)),
                                 request_topic=self.topics.update_request_for,
                                 on_error=lambda p, e: self.errors.append((p, e)),
                                 clock=self.clock, retry_after=1.0, timeout=60.0, **kw)
        assert server.wait_subscribed(5)

    def sender(self, blob: bytes, chunk_size: int) -> tuple[ChunkSender, list[int]]:
        """A sender that answers requests but has published nothing yet; logs what it resends."""
        topics = self.topics.update("dev1", sha256(blob))
        s = ChunkSender(self.device, topics, blob, chunk_size)
        resent: list[int] = []
        orig = s.resend

        def logged(indices, count=True):
            if count:
                resent.extend(indices)
            orig(indices, count)

        s.resend = logged
        self.device.subscribe(topics.request, s.handle_request)
        assert self.device.wait_subscribed(5)
        return s, resent

    def tick(self) -> None:
        self.server.pump(timeout=0.01)
        self.device.pump()
        self.recv.poll()
        self.clock.advance(0.05)

    def drive(self, until, timeout: float = 30.0) -> bool:
        return self.server.run_until(until, timeout, tick=self.tick, step=0.01)


def _session(net, **kw) -> Session:
    tag = uuid.uuid4().hex[:8]
    return Session(net.connect("server", f"server-{tag}"), net.connect("dev1", f"dev1-{tag}"),
                   **kw)


def test_blob_arrives_intact(net):
    s = _session(net)
    blob = os.urandom(3 << 20)
    topics = s.topics.update("dev1", sha256(blob))
    sender = send_blob(s.device, topics, blob, chunk_size=256 << 10)
    assert s.drive(lambda: s.got)
    assert s.got == [(topics.prefix, blob)] and not s.errors
    sender.close()


def test_empty_blob(net):
    s = _session(net)
    topics = s.topics.update("dev1", sha256(b""))
    send_blob(s.device, topics, b"")
    assert s.drive(lambda: s.got)
    assert s.got == [(topics.prefix, b"")]


def test_duplicates_and_reordering_are_harmless(net):
    s = _session(net)
    blob = os.urandom(40 * 1024 + 123)
    sender, resent = s.sender(blob, chunk_size=1024)
    n = len(sender.manifest.chunks)
    order = list(range(n)) * 2
    random.Random(0).shuffle(order)
    prefix = sender.topics.prefix
    s.device.publish(f"{prefix}/chunk/3", b"corrupt")  # wrong bytes for chunk 3: dropped
    s.device.publish(f"{prefix}/chunk/{n + 5}", b"x")  # out of range: dropped
    sender.resend(order[: n // 2], count=False)  # chunks before the manifest
    sender.publish_manifest()
    sender.resend(order[n // 2:], count=False)
    sender.publish_manifest()
    assert s.drive(lambda: s.got)
    sender.resend(range(n), count=False)  # a full duplicate after completion
    sender.publish_manifest()
    s.drive(lambda: False, timeout=0.3)
    assert s.got == [(prefix, blob)] and not s.errors


def test_resume_asks_only_for_missing_chunks(net):
    s = _session(net)
    blob = os.urandom(64 * 1024)
    sender, resent = s.sender(blob, chunk_size=2048)
    n = len(sender.manifest.chunks)
    sender.publish_manifest()
    sender.resend(range(0, n, 2), count=False)  # the odd chunks are "lost"
    assert s.drive(lambda: s.got)
    assert s.got == [(sender.topics.prefix, blob)]
    assert resent and set(resent) <= set(range(1, n, 2))  # never a chunk it already had
    assert s.recv.requests_sent >= 1


def test_manifest_is_requested_when_missed(net):
    s = _session(net)
    blob = os.urandom(10_000)
    sender, _ = s.sender(blob, chunk_size=1000)
    sender.resend(range(10), count=False)  # no manifest at all
    assert s.drive(lambda: s.got)
    assert s.got == [(sender.topics.prefix, blob)]


# ---------------------------------------------------------------------------------------------
# Resume across a dropped connection / broker restart


class _Backend:
    def __init__(self, kind: str, tmp_path) -> None:
        self.kind, self.tmp_path = kind, tmp_path
        self.hub = MemoryHub() if kind == "memory" else None
        self.amqtt = EmbeddedBroker().start() if kind == "amqtt" else None
        self.mosq = make_mosquitto(tmp_path).start() if kind == "mosquitto" else None
        self.opened = []

    def connect(self, account: str, cid: str):
        if self.hub is not None:
            t = self.hub.connect(cid)
        elif self.amqtt is not None:
            t = MqttTransport(TransportConfig(url=self.amqtt.url, reconnect_min=0.05,
                                              reconnect_max=0.3), cid)
        else:
            t = self.mosq.connect(account, cid)
        self.opened.append(t)
        return t

    def restart(self, session: Session) -> None:
        if self.hub is not None:
            session.server.drop()
            session.device.drop()
            session.server.reconnect()
            session.device.reconnect()
        elif self.amqtt is not None:
            port = self.amqtt.port
            self.amqtt.stop()
            self.amqtt = EmbeddedBroker(port=port).start()
        else:
            self.mosq.kill()
            self.mosq.start()

    def close(self) -> None:
        for t in self.opened:
            t.close()
        if self.amqtt is not None:
            self.amqtt.stop()
        if self.mosq is not None:
            self.mosq.stop()


@pytest.mark.parametrize("kind", ["memory", "amqtt",
                                  pytest.param("mosquitto", marks=pytest.mark.broker)])
def test_transfer_survives_broker_restart(kind, tmp_path):
    backend = _Backend(kind, tmp_path)
    try:
        tag = uuid.uuid4().hex[:8]
        s = Session(backend.connect("server", f"server-{tag}"),
                    backend.connect("dev1", f"dev1-{tag}"))
        blob = os.urandom(4 << 20)
        sender, resent = s.sender(blob, chunk_size=32 << 10)
        n = len(sender.manifest.chunks)
        sender.publish_manifest()
        sender.resend(range(n // 2), count=False)
        assert s.drive(lambda: (s.recv.progress(sender.topics.prefix) or (0,))[0] >= n // 4)
        backend.restart(s)
        s.server.pump()
        had = n - len(s.recv.active[sender.topics.prefix].missing())
        have_before = set(range(n)) - set(s.recv.active[sender.topics.prefix].missing())
        sender.resend(range(n // 2, n), count=False)  # the rest, possibly into the outage
        assert s.drive(lambda: s.got, timeout=40)
        assert s.got == [(sender.topics.prefix, blob)]
        assert had >= n // 4 and not set(resent) & have_before  # resumed, not restarted
    finally:
        backend.close()


# ---------------------------------------------------------------------------------------------
# Receiver limits and failures (memory only: pure protocol logic)


def _memory_session(**kw) -> Session:
    hub = MemoryHub()
    return Session(hub.connect("server"), hub.connect("dev1"), **kw)


def test_stale_transfer_times_out():
    s = _memory_session()
    blob = os.urandom(5000)
    sender, _ = s.sender(blob, chunk_size=1000)
    s.device.unsubscribe(sender.topics.request)  # the sender went away
    sender.publish_manifest()
    s.server.pump()
    s.clock.advance(61)
    s.recv.poll()
    assert not s.got and len(s.errors) == 1 and "timed out" in str(s.errors[0][1])
    assert not s.recv.active


def test_oversized_and_malformed_manifests_are_rejected():
    s = _memory_session(max_bytes=10_000)
    prefix = s.topics.update("dev1", "0" * 64).prefix
    s.device.publish(f"{prefix}/manifest", b"{not json")
    h = sha256(b"x")

    def manifest(size: int, chunk_size: int, chunks: list[str]) -> bytes:
        return json.dumps({"v": 1, "sha256": h, "size": size, "chunk_size": chunk_size,
                           "chunks": chunks}).encode()

    s.device.publish(f"{prefix}/manifest", manifest(20_000, 10_000, [h, h]))  # too large
    s.device.publish(f"{prefix}/manifest", manifest(10, 5, [h]))  # wrong chunk count
    s.server.pump()
    assert len(s.errors) == 3 and not s.recv.active


def test_whole_blob_hash_is_verified():
    s = _memory_session()
    blob = os.urandom(3000)
    sender, _ = s.sender(blob, chunk_size=1000)
    object.__setattr__(sender.manifest, "sha256", "f" * 64)  # chunks fine, whole wrong
    sender.publish_manifest()
    sender.resend(range(3), count=False)
    s.server.pump()
    assert not s.got and "does not match" in str(s.errors[0][1])


def test_pending_chunks_are_bounded():
    s = _memory_session(max_bytes=4096)
    prefix = s.topics.update("dev1", "1" * 64).prefix
    for i in range(10):
        s.device.publish(f"{prefix}/chunk/{i}", b"z" * 1024)
    s.server.pump()
    assert s.recv._pending_bytes <= 4096
