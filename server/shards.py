"""The global model's shards, served to the devices that ask for them.

When a round opens, the coordinator cuts the global state into content-addressed shards
(:func:`hfedmoe.modelsync.build_shards`; the manifest goes out with the round announcement).
A device asks for a shard on ``update/{device}/fetch/{sha}``
(:class:`hfedmoe.protocol.FetchRequest`) and gets it as manifest + chunks on ``model/{sha}``
(:class:`hfedmoe.transport.chunks.ChunkSender`): every device asks at the start of a round, so
one whole broadcast serves all of them, and a device that subscribed late asks for the chunks
it lacks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from hfedmoe.errors import ProtocolError
from hfedmoe.modelsync import ModelManifest, build_shards
from hfedmoe.protocol import FetchRequest
from hfedmoe.transport.base import Message, Transport
from hfedmoe.transport.chunks import ChunkSender
from hfedmoe.transport.topics import Topics
from server.config import ServerConfig


class ModelShards:
    """The open round's model shards and their senders.

    Args:
        cfg: the server config (chunk size, retry interval).
        transport: the coordinator's transport.
        known: whether a device is registered (only registered devices are served).
    """

    def __init__(self, cfg: ServerConfig, transport: Transport,
                 known: Callable[[str], bool]) -> None:
        self.cfg = cfg
        self.transport = transport
        self.known = known
        self.topics = Topics(cfg.run_id)
        self.blobs: dict[str, bytes] = {}  # shard sha -> blob
        self.senders: dict[str, ChunkSender] = {}
        self.sent_full: dict[str, float] = {}  # shard sha -> when it was last sent whole

    def publish(self, state: Mapping[str, Any]) -> ModelManifest:
        """Shard ``state`` for the round that opens; its manifest."""
        manifest, blobs = build_shards(state)
        self.blobs = {**{s: b for s, b in self.blobs.items() if s in set(blobs)}, **blobs}
        return manifest

    def on_fetch(self, message: Message) -> int:
        """Answer a device's fetch request; the bytes of model sent (0: none)."""
        parts = self.topics.parse(message.topic)  # update/{device}/fetch/{sha}
        device, sha = parts[1], parts[3]
        blob = self.blobs.get(sha)
        if blob is None or not self.known(device):
            return 0
        try:
            want = FetchRequest.from_bytes(message.payload)
        except ProtocolError:
            return 0
        sender = self.senders.get(sha)
        if sender is None:
            sender = self.senders[sha] = ChunkSender(self.transport, self.topics.model(sha), blob,
                                                     self.cfg.transport.chunk_size)
        recently = time.monotonic() - self.sent_full.get(sha, -1e9) < self.cfg.transport.retry_after
        if want.manifest and recently:
            # every device asks at the start of a round; one broadcast serves all of them,
            # and a device that subscribed late asks for the chunks it lacks
            sender.publish_manifest()
            return 0
        if want.manifest:
            sender.publish_manifest()
            sender.resend(range(len(sender.manifest.chunks)))
            self.sent_full[sha] = time.monotonic()
            return len(blob)
        sender.answer(want, message.topic)
        n = len(sender.manifest.chunks)
        return sum(sender.manifest.chunk_len(i) for i in want.chunks) if want.fits(n) else 0

    def close(self) -> None:
        for sender in self.senders.values():
            sender.close()
