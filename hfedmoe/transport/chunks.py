"""Content-addressed chunked transfer of large blobs over any :class:`Transport`.

A sender publishes ``{prefix}/manifest`` (JSON: sha256 of the whole, size, chunk size, the
sha256 of every chunk) and ``{prefix}/chunk/{i}`` (raw bytes). A receiver reassembles in any
order, verifies every chunk and the whole, drops duplicates, and when a transfer stalls it
publishes a resend request (:class:`hfedmoe.protocol.FetchRequest`) listing only what
it lacks; the sender answers with just those. Across a dropped connection or a broker restart
the receiver keeps what it has and asks for the rest, so a transfer resumes instead of starting
over. Stale transfers time out; all sizes are bounded. The clock is injectable for tests.

A blob of at most ``whole_max`` bytes (the receiver's side says how large, e.g. a round
announcement) travels as one message ``{prefix}/whole``: ``WHOLE_MAGIC``, the manifest's length
(4 bytes, big-endian), the manifest, the blob. One message lands on one subscriber, which is what
lets several receivers share a topic through an MQTT 5 shared subscription (``$share/...``)
without a transfer's pieces being dealt to different receivers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hfedmoe.errors import ProtocolError, TransferError
from hfedmoe.protocol import FetchRequest
from hfedmoe.transport.base import Message, Transport
from hfedmoe.transport.topics import TransferTopics

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 1 << 20
MANIFEST_VERSION = 1
MAX_MANIFEST_BYTES = 16 << 20  # ~230k chunk hashes
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK_TOPIC = re.compile(r"^(?P<prefix>.+)/chunk/(?P<idx>\d{1,9})$")
WHOLE_MAGIC = b"HFW1"
Clock = Callable[[], float]


def sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Manifest:
    """What a blob is: its hash and size, and the hash of every chunk."""

    sha256: str
    size: int
    chunk_size: int
    chunks: tuple[str, ...]

    @classmethod
    def build(cls, blob: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Manifest:
        if chunk_size < 1:
            raise TransferError("chunk_size must be >= 1")
        view = memoryview(blob)
        hashes = tuple(sha256(view[i:i + chunk_size]) for i in range(0, len(blob), chunk_size))
        return cls(sha256(blob), len(blob), chunk_size, hashes)

    def to_json(self) -> bytes:
        return json.dumps({"v": MANIFEST_VERSION, "sha256": self.sha256, "size": self.size,
                           "chunk_size": self.chunk_size, "chunks": list(self.chunks)}).encode()

    @classmethod
    def from_json(cls, data: bytes, max_bytes: int, max_chunk_size: int) -> Manifest:
        """Parse and validate an untrusted manifest; raise :class:`TransferError`."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise TransferError(f"manifest of {len(data)} bytes > {MAX_MANIFEST_BYTES}")
        try:
            raw = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise TransferError(f"manifest is not JSON: {exc}") from exc
        if not isinstance(raw, dict) or raw.get("v") != MANIFEST_VERSION:
            raise TransferError("manifest is not a version-1 object")
        digest, size, chunk_size, chunks = (raw.get(k) for k in ("sha256", "size", "chunk_size",
                                                                  "chunks"))
        if not (isinstance(digest, str) and _HEX64.fullmatch(digest)):
            raise TransferError("manifest sha256 malformed")
        if type(size) is not int or not 0 <= size <= max_bytes:
            raise TransferError(f"manifest size {size!r} outside [0, {max_bytes}]")
        if type(chunk_size) is not int or not 1 <= chunk_size <= max_chunk_size:
            raise TransferError(f"manifest chunk_size {chunk_size!r} outside [1, {max_chunk_size}]")
        want = -(-size // chunk_size)
        if not (isinstance(chunks, list) and len(chunks) == want
                and all(isinstance(c, str) and _HEX64.fullmatch(c) for c in chunks)):
            raise TransferError(f"manifest must list {want} chunk hashes")
        return cls(digest, size, chunk_size, tuple(chunks))

    def chunk_len(self, idx: int) -> int:
        return min(self.chunk_size, self.size - idx * self.chunk_size)


class Reassembler:
    """Collects the chunks of one manifest, in any order, verifying each (pure state, no I/O)."""

    def __init__(self, manifest: Manifest, clock: Clock = time.monotonic) -> None:
        self.manifest = manifest
        self._buf = bytearray(manifest.size)
        self._have = [False] * len(manifest.chunks)
        self._count = 0
        self._clock = clock
        self.started = self.last_progress = clock()
        self.duplicates = self.corrupt = 0

    def add(self, idx: int, data: bytes) -> bool:
        """Store chunk ``idx``; return True if it was new and valid (dups/corrupt are dropped)."""
        m = self.manifest
        if not 0 <= idx < len(m.chunks):
            self.corrupt += 1
            return False
        if self._have[idx]:
            self.duplicates += 1
            return False
        if len(data) != m.chunk_len(idx) or sha256(data) != m.chunks[idx]:
            self.corrupt += 1
            return False
        start = idx * m.chunk_size
        self._buf[start:start + len(data)] = data
        self._have[idx] = True
        self._count += 1
        self.last_progress = self._clock()
        return True

    @property
    def done(self) -> bool:
        return self._count == len(self._have)

    @property
    def received(self) -> int:
        return self._count

    def missing(self) -> list[int]:
        return [i for i, have in enumerate(self._have) if not have]

    def assemble(self) -> bytes:
        """The whole blob, verified against the manifest hash."""
        if not self.done:
            raise TransferError(f"transfer incomplete: {len(self.missing())} chunks missing")
        blob = bytes(self._buf)
        if sha256(blob) != self.manifest.sha256:
            raise TransferError("reassembled blob does not match the manifest sha256")
        return blob


class ChunkSender:
    """Publishes one blob as manifest + chunks and answers resend requests until closed."""

    def __init__(self, transport: Transport, topics: TransferTopics, blob: bytes,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, qos: int = 1, retain: bool = False,
                 whole_max: int = 0) -> None:
        self.transport, self.topics, self.blob = transport, topics, bytes(blob)
        self.manifest = Manifest.build(self.blob, chunk_size)
        self.qos, self.retain = qos, retain
        self.whole = 0 < len(self.blob) <= whole_max  # one message instead of manifest + chunks
        self.resent = 0
        self._subscribed = False

    def start(self) -> ChunkSender:
        if self.topics.request and not self.whole:
            self.transport.subscribe(self.topics.request, self.handle_request, qos=self.qos)
            self._subscribed = True
        self.publish_manifest()
        self.resend(range(len(self.manifest.chunks)), count=False)
        return self

    def publish_manifest(self) -> None:
        if self.whole:  # the whole message is manifest and data at once
            return
        self.transport.publish(f"{self.topics.prefix}/manifest", self.manifest.to_json(),
                               qos=self.qos, retain=self.retain)

    def _publish_whole(self) -> None:
        head = self.manifest.to_json()
        self.transport.publish(f"{self.topics.prefix}/whole",
                               WHOLE_MAGIC + len(head).to_bytes(4, "big") + head + self.blob,
                               qos=self.qos, retain=self.retain)

    def resend(self, indices: Sequence[int] | range, count: bool = True) -> None:
        if self.whole:
            if len(indices):
                self._publish_whole()
                self.resent += int(count)
            return
        view, size = memoryview(self.blob), self.manifest.chunk_size
        for i in indices:
            self.transport.publish(f"{self.topics.prefix}/chunk/{i}",
                                   bytes(view[i * size:(i + 1) * size]), qos=self.qos,
                                   retain=self.retain)
            self.resent += int(count)

    def handle_request(self, message: Message) -> None:
        """Answer a :class:`~hfedmoe.protocol.FetchRequest` with only what it lists."""
        try:
            request = FetchRequest.from_bytes(message.payload)
        except ProtocolError as exc:
            log.warning("ignoring malformed resend request on %s: %s", message.topic, exc)
            return
        self.answer(request, message.topic)

    def answer(self, request: FetchRequest, topic: str = "") -> None:
        """Send the manifest and the chunks ``request`` lists (none if one does not exist)."""
        if not request.fits(len(self.manifest.chunks)):
            log.warning("ignoring resend request on %s: chunk out of range", topic)
            return
        if request.manifest:
            self.publish_manifest()
        self.resend(sorted(set(request.chunks)))

    def close(self) -> None:
        if self._subscribed:
            self.transport.unsubscribe(self.topics.request, self.handle_request)
            self._subscribed = False


def send_blob(transport: Transport, topic_prefix: str | TransferTopics, blob: bytes, *,
              chunk_size: int = DEFAULT_CHUNK_SIZE, qos: int = 1,
              retain: bool = False, whole_max: int = 0) -> ChunkSender:
    """Publish ``blob`` under ``topic_prefix`` and keep answering resend requests.

    Args:
        topic_prefix: a prefix (requests then arrive on ``{prefix}/request``) or
            :class:`TransferTopics` naming the request topic explicitly.
        whole_max: a blob of at most this many bytes goes as one ``{prefix}/whole`` message
            (0: always manifest + chunks).

    Returns:
        The sender; call ``close()`` once the receiver acknowledged the blob.
    """
    topics = topic_prefix if isinstance(topic_prefix, TransferTopics) \
        else TransferTopics(topic_prefix, f"{topic_prefix}/request")
    return ChunkSender(transport, topics, blob, chunk_size, qos, retain, whole_max).start()


@dataclass
class _Pending:
    """Chunks that arrived before their manifest."""

    first_seen: float
    chunks: dict[int, bytes]
    last_request: float


class BlobReceiver:
    """Receives every chunked transfer under ``topic_filter`` and hands complete blobs over.

    Call :meth:`poll` regularly (e.g. after each ``transport.pump``): it re-requests missing
    chunks of stalled transfers and times out stale ones.

    Args:
        transport: where to subscribe.
        topic_filter: e.g. ``"{prefix}/#"`` or ``Topics.all_updates()``.
        on_blob: ``(prefix, blob)`` for each verified blob (once per prefix).
        request_topic: prefix -> resend topic (default ``{prefix}/request``).
        on_error: ``(prefix, TransferError)`` when a transfer fails or times out.
        retry_after: seconds without progress before asking for missing chunks (and between asks).
        timeout: seconds without progress before a transfer is dropped.
        max_bytes: largest blob accepted; also bounds buffered early chunks.
    """

    def __init__(self, transport: Transport, topic_filter: str | Sequence[str],
                 on_blob: Callable[[str, bytes], None], *,
                 request_topic: Callable[[str], str] | None = None,
                 on_error: Callable[[str, TransferError], None] | None = None,
                 clock: Clock = time.monotonic, retry_after: float = 2.0, timeout: float = 300.0,
                 max_bytes: int = 1 << 30, max_chunk_size: int = 16 << 20,
                 max_transfers: int = 256, qos: int = 1) -> None:
        self.transport, self.on_blob = transport, on_blob
        # one filter, or several (e.g. only ".../manifest" and ".../chunk/+" of a tree whose
        # whole messages other receivers take through a shared subscription)
        self.topic_filters = [topic_filter] if isinstance(topic_filter, str) else list(topic_filter)
        self.topic_filter = self.topic_filters[0]
        self.request_topic = request_topic or (lambda prefix: f"{prefix}/request")
        self.on_error = on_error
        self.clock, self.retry_after, self.timeout = clock, retry_after, timeout
        self.max_bytes, self.max_chunk_size, self.max_transfers = max_bytes, max_chunk_size, \
            max_transfers
        self.qos = qos
        self.active: dict[str, Reassembler] = {}
        self._last_request: dict[str, float] = {}
        self._pending: dict[str, _Pending] = {}
        self._pending_bytes = 0
        self._done: OrderedDict[str, str] = OrderedDict()  # prefix -> sha, bounded
        self.requests_sent = 0
        for f in self.topic_filters:
            transport.subscribe(f, self._on_message, qos=qos)

    # -- message handling (runs on the pumping thread) -------------------------------------
    def _on_message(self, message: Message) -> None:
        topic = message.topic
        if topic.endswith("/manifest"):
            self._on_manifest(topic[: -len("/manifest")], message.payload)
        elif m := _CHUNK_TOPIC.fullmatch(topic):
            self._on_chunk(m.group("prefix"), int(m.group("idx")), message.payload)
        elif topic.endswith("/whole"):
            self._on_whole(topic[: -len("/whole")], message.payload)

    def _on_whole(self, prefix: str, payload: bytes) -> None:
        """A one-message transfer: verify it against its own manifest, hand it over."""
        try:
            if payload[:len(WHOLE_MAGIC)] != WHOLE_MAGIC or len(payload) < len(WHOLE_MAGIC) + 4:
                raise TransferError("whole message without its header")
            at = len(WHOLE_MAGIC) + 4
            n = int.from_bytes(payload[len(WHOLE_MAGIC):at], "big")
            if n > len(payload) - at:
                raise TransferError(f"whole message: manifest length {n} past the payload")
            manifest = Manifest.from_json(payload[at:at + n], self.max_bytes,
                                          self.max_chunk_size)
            blob = payload[at + n:]
            if len(blob) != manifest.size or sha256(blob) != manifest.sha256:
                raise TransferError("whole message: data does not match its manifest")
        except TransferError as exc:
            self._fail(prefix, exc)
            return
        if self._done.get(prefix) == manifest.sha256:
            return
        self.active.pop(prefix, None)
        self._done[prefix] = manifest.sha256
        while len(self._done) > 4 * self.max_transfers:
            self._done.popitem(last=False)
        self.on_blob(prefix, blob)

    def _on_manifest(self, prefix: str, payload: bytes) -> None:
        if prefix in self._done or prefix in self.active:
            return
        try:
            manifest = Manifest.from_json(payload, self.max_bytes, self.max_chunk_size)
        except TransferError as exc:
            self._fail(prefix, exc)
            return
        if len(self.active) >= self.max_transfers:
            self._fail(prefix, TransferError(f"too many concurrent transfers (> {self.max_transfers})"))
            return
        r = self.active[prefix] = Reassembler(manifest, self.clock)
        self._last_request[prefix] = self.clock()
        early = self._pending.pop(prefix, None)
        if early is not None:
            for idx, data in early.chunks.items():
                self._pending_bytes -= len(data)
                r.add(idx, data)
        self._maybe_finish(prefix)

    def _on_chunk(self, prefix: str, idx: int, data: bytes) -> None:
        if prefix in self._done:
            return
        r = self.active.get(prefix)
        if r is not None:
            if r.add(idx, data):
                self._maybe_finish(prefix)
            return
        if len(data) > self.max_chunk_size or self._pending_bytes + len(data) > self.max_bytes:
            return  # it will be asked for again once the manifest is known
        pend = self._pending.setdefault(prefix, _Pending(self.clock(), {}, self.clock()))
        if idx not in pend.chunks:
            pend.chunks[idx] = bytes(data)
            self._pending_bytes += len(data)

    def _maybe_finish(self, prefix: str) -> None:
        r = self.active[prefix]
        if not r.done:
            return
        del self.active[prefix]
        self._last_request.pop(prefix, None)
        try:
            blob = r.assemble()
        except TransferError as exc:
            self._fail(prefix, exc)
            return
        self._done[prefix] = r.manifest.sha256
        while len(self._done) > 4 * self.max_transfers:
            self._done.popitem(last=False)
        self.on_blob(prefix, blob)

    def _fail(self, prefix: str, exc: TransferError) -> None:
        log.warning("transfer %s failed: %s", prefix, exc)
        if self.on_error is not None:
            self.on_error(prefix, exc)

    # -- periodic work ---------------------------------------------------------------------
    def poll(self) -> None:
        """Re-request what stalled transfers lack; time out stale ones."""
        now = self.clock()
        for prefix, r in list(self.active.items()):
            idle = now - r.last_progress
            if idle >= self.timeout:
                del self.active[prefix]
                self._last_request.pop(prefix, None)
                self._fail(prefix, TransferError(
                    f"timed out after {idle:.1f}s with {r.received}/{len(r.manifest.chunks)} chunks"))
            elif idle >= self.retry_after and now - self._last_request[prefix] >= self.retry_after:
                self._request(prefix, False, r.missing())
                self._last_request[prefix] = now
        for prefix, pend in list(self._pending.items()):
            if now - pend.first_seen >= self.timeout:
                self._pending_bytes -= sum(len(c) for c in pend.chunks.values())
                del self._pending[prefix]
                self._fail(prefix, TransferError("timed out waiting for the manifest"))
            elif now - pend.last_request >= self.retry_after:
                self._request(prefix, True, [])
                pend.last_request = now

    def _request(self, prefix: str, manifest: bool, chunks: list[int]) -> None:
        body = FetchRequest(manifest, tuple(chunks)).to_bytes()
        self.transport.publish(self.request_topic(prefix), body, qos=self.qos)
        self.requests_sent += 1

    def progress(self, prefix: str) -> tuple[int, int] | None:
        """(chunks received, chunks total) of an active transfer."""
        r = self.active.get(prefix)
        return None if r is None else (r.received, len(r.manifest.chunks))

    def completed(self, prefix: str) -> bool:
        return prefix in self._done

    def forget(self, prefix: str) -> None:
        """Accept ``prefix`` again (e.g. the sender reuses it for a new blob)."""
        self._done.pop(prefix, None)

    def close(self) -> None:
        for f in self.topic_filters:
            self.transport.unsubscribe(f, self._on_message)
