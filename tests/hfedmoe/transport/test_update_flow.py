"""An encoded update travels device -> server as chunks and decodes; a model blob travels
server -> device with the device's fetch topic for resends (in-memory hub)."""

from __future__ import annotations

import os

import torch

from hfedmoe import wire
from hfedmoe.names import ExpertId
from hfedmoe.transport.chunks import BlobReceiver, ChunkSender, send_blob, sha256
from hfedmoe.transport.memory import MemoryHub
from hfedmoe.transport.topics import Topics
from hfedmoe.update import SparseUpdate
from tests.hfedmoe.transport.conftest import ManualClock


def test_update_over_chunks_decodes():
    hub, topics = MemoryHub(), Topics("run1")
    server, dev = hub.connect("server"), hub.connect("dev1")
    state = {"layers.0.experts.1.w": torch.randn(64, 32), "layers.0.gate.weight": torch.randn(4, 32)}
    update = SparseUpdate("run1", 2, "dev1", 10, state, usage={ExpertId(0, 1): 0.4},
                          updated=frozenset({ExpertId(0, 1)}), base_model_hash="h")
    blob = wire.encode(update, 0.1, wire.WireConfig(dtype="bfloat16", compress=True))
    decoded = []

    def on_blob(prefix: str, data: bytes) -> None:
        device, _ = topics.parse_update_prefix(prefix)
        decoded.append(wire.decode(data, wire.spec_from_state(state), run_id="run1",
                                   client_id=device, round_idx=2, base_model_hash="h"))

    BlobReceiver(server, topics.all_updates(), on_blob, request_topic=topics.update_request_for)
    send_blob(dev, topics.update("dev1", sha256(blob)), blob, chunk_size=1024)
    server.pump()
    assert len(decoded) == 1 and decoded[0].updated == {ExpertId(0, 1)}
    torch.testing.assert_close(decoded[0].deltas["layers.0.experts.1.w"],
                               state["layers.0.experts.1.w"], atol=1e-2, rtol=1e-2)


def test_model_broadcast_with_fetch_resends():
    hub, topics, clock = MemoryHub(), Topics("run1"), ManualClock()
    server, dev = hub.connect("server"), hub.connect("dev1")
    blob = os.urandom(50_000)
    sha = sha256(blob)
    sender = ChunkSender(server, topics.model(sha), blob, chunk_size=4096, retain=True)
    server.subscribe(topics.all_fetches(), sender.handle_request)
    hub.drop_filter = lambda m: m.topic.endswith(("/chunk/3", "/chunk/7"))  # lost once
    sender.start()
    hub.drop_filter = None
    got = {}
    recv = BlobReceiver(dev, topics.all_models(), lambda p, b: got.setdefault(p, b),
                        request_topic=lambda prefix: topics.model_fetch("dev1", prefix[-64:]),
                        clock=clock, retry_after=1.0)
    dev.pump()  # retained manifest + chunks, minus the two lost ones
    assert recv.progress(topics.model(sha).prefix) == (len(sender.manifest.chunks) - 2,
                                                      len(sender.manifest.chunks))
    clock.advance(2)
    recv.poll()  # asks on dev1's fetch topic
    server.pump()
    dev.pump()
    assert got[topics.model(sha).prefix] == blob and sender.resent == 2
