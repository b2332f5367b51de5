"""The device's side of the run's topics: registration, round announcements and acks in, the
global model's shards in (fetched on demand), sparse updates out as chunked transfers.

Nothing here runs on paho's network thread: the transport only enqueues, and
:meth:`ServerLink.pump_until` delivers messages to the handlers on the agent's own thread,
polling open shard transfers as it goes.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hfedmoe.errors import HFedMoEError, ProtocolError, TransportError
from hfedmoe.modelsync import ModelManifest, ShardCache
from hfedmoe.protocol import (
    DeviceStatus,
    Done,
    FetchRequest,
    Registered,
    Registration,
    RoundAnnouncement,
    UpdateAck,
    decode_ack,
    decode_round,
)
from hfedmoe.transport.base import Message, Transport
from hfedmoe.transport.chunks import BlobReceiver, send_blob
from hfedmoe.transport.topics import Topics

if TYPE_CHECKING:
    from device_agent.config import AgentConfig

log = logging.getLogger("hfedmoe.agent")


class AgentStopped(Exception):
    """Raised inside training or a wait when SIGTERM asked the agent to stop."""


class ServerLink:
    """One device's connection to the server over a :class:`Transport`.

    Attributes:
        announcement: the latest round announcement (retained by the broker).
        done: the server said the run is over.
        registered: the server acknowledged the latest registration.
        acks: the server's acks of this device's updates, by the update's sha256.
        secagg: the server's latest secure-aggregation message of each kind (roster, share
            relay, unmask request) by its kind byte (:mod:`device_agent.secure_session`).
    """

    def __init__(self, cfg: AgentConfig, transport: Transport | None = None,
                 clock: Callable[[], float] = time.time,
                 stopped: Callable[[], bool] = lambda: False) -> None:
        self.cfg = cfg
        self.device_id = cfg.device_id
        self.topics = Topics(cfg.run_id)
        self.transport = transport
        self.clock = clock
        self.stopped = stopped  # SIGTERM: every wait raises AgentStopped
        self._owns_transport = transport is None
        self._broker: Any = None
        self.announcement: RoundAnnouncement | None = None
        self.done = False
        self.registered = False
        self.acks: dict[str, UpdateAck] = {}
        self.secagg: dict[int, bytes] = {}  # the server's secure-round messages, by kind byte
        self.receivers: list[BlobReceiver] = []  # open model-shard transfers

    def connect(self, registration: Callable[[], Registration]) -> None:
        """Subscribe, say online, and register until the server answers (it may start after
        this device)."""
        if self.transport is None:
            from hfedmoe.transport.mqtt import open_transport

            self.transport, self._broker = open_transport(
                self.cfg.transport, self.device_id, self.topics.status(self.device_id))
        t = self.transport
        t.subscribe(self.topics.round(), self._on_round)
        t.subscribe(self.topics.ack_tree(self.device_id), self._on_ack)
        t.wait_subscribed()
        self.publish_status(DeviceStatus("online"))
        while not self.pump_until(lambda: self.registered, self.clock() + 5.0):
            self.register(registration())

    def register(self, reg: Registration) -> None:
        self.registered = False
        self._transport.publish(self.topics.register(self.device_id), reg.to_bytes())

    def publish_status(self, status: DeviceStatus) -> None:
        """Publish this device's retained status (raises :class:`TransportError`)."""
        self._transport.publish(self.topics.status(self.device_id), status.to_bytes(),
                                retain=True)

    def close(self) -> None:
        if self.transport is not None and self._owns_transport:
            try:
                self.publish_status(DeviceStatus("offline"))
                self.transport.close()
            except TransportError:
                pass
        if self._broker is not None:
            self._broker.stop()

    @property
    def _transport(self) -> Transport:
        assert self.transport is not None, "connect() first"
        return self.transport

    # --- waiting -----------------------------------------------------------------------------
    def pump(self, timeout: float) -> None:
        """Deliver what arrived (``timeout`` 0: without waiting)."""
        self._transport.pump(timeout=timeout)

    def pump_until(self, predicate: Callable[[], bool], deadline: float) -> bool:
        """Pump until ``predicate`` holds (True) or the clock reaches ``deadline`` (False)."""
        while not predicate():
            if self.stopped():
                raise AgentStopped
            if self.clock() >= deadline:
                return False
            self._transport.pump(timeout=0.1)
            for receiver in self.receivers:
                receiver.poll()
        return True

    # --- messages ----------------------------------------------------------------------------
    def _on_round(self, message: Message) -> None:
        try:
            msg = decode_round(message.payload)
        except ProtocolError as exc:
            log.warning("%s: ignoring a malformed round announcement: %s", self.device_id, exc)
            return
        if isinstance(msg, Done):
            self.done = True
        else:
            self.announcement = msg

    def _on_ack(self, message: Message) -> None:
        if message.topic == self.topics.secagg(self.device_id):  # checked by the session
            if len(message.payload) > 4:
                self.secagg[message.payload[4]] = bytes(message.payload)
            return
        try:
            ack = decode_ack(message.payload)
        except ProtocolError as exc:
            log.warning("%s: ignoring a malformed ack: %s", self.device_id, exc)
            return
        if isinstance(ack, Registered):
            self.registered = True
        elif ack.sha:
            self.acks[ack.sha] = ack
        elif ack.rejected:
            log.warning("server rejected a message: %s: %s", ack.error, ack.reason)

    def _on_shard(self, cache: ShardCache, prefix: str, blob: bytes) -> None:
        sha = prefix.rsplit("/", 1)[-1]
        try:
            cache.add_blob(blob, sha)
        except HFedMoEError as exc:
            log.warning("dropping model shard %s: %s", sha[:12], exc)
            for receiver in self.receivers:
                receiver.forget(prefix)

    # --- model in, update out ----------------------------------------------------------------
    def fetch_model(self, cache: ShardCache, manifest: ModelManifest, deadline: float) -> int:
        """Fetch the shards ``cache`` lacks; returns the bytes downloaded."""
        missing = cache.missing(manifest)
        t, device = self._transport, self.device_id
        # one subscription per needed shard: shards this device has never reach it
        self.receivers = [BlobReceiver(
            t, f"{self.topics.model(sha).prefix}/#",
            lambda prefix, blob: self._on_shard(cache, prefix, blob),
            request_topic=lambda prefix: self.topics.model_fetch(device, prefix.rsplit("/", 1)[-1]),
            retry_after=self.cfg.transport.retry_after,
            timeout=self.cfg.transport.transfer_timeout) for sha in missing]
        try:
            t.wait_subscribed()
            for sha in missing:
                t.publish(self.topics.model_fetch(device, sha),
                          FetchRequest(manifest=True).to_bytes())
            if not self.pump_until(lambda: not cache.missing(manifest), deadline):
                raise TransportError(f"{len(cache.missing(manifest))} model shard(s) did "
                                     f"not arrive before the deadline")
        finally:
            for receiver in self.receivers:
                receiver.close()
            self.receivers = []
        return cache.nbytes(missing)

    def send_update(self, round_idx: int, blob: bytes, deadline: float,
                    whole_max: int = 0) -> str:
        """Chunked upload, re-announced until the server acks it (or the round is long gone);
        the ack's status, or "unacknowledged"."""
        sha = hashlib.sha256(blob).hexdigest()
        timeout = self.cfg.ack_timeout_s
        # a blob the server takes as one message (whole_max_bytes of the announcement) goes
        # as one: with sharded ingestion it lands on a single ingest worker
        sender = send_blob(self._transport, self.topics.update(self.device_id, sha), blob,
                           chunk_size=self.cfg.transport.chunk_size, whole_max=whole_max)
        give_up = max(deadline, self.clock()) + 3 * timeout
        try:
            while not self.pump_until(lambda: sha in self.acks,
                                      min(self.clock() + timeout, give_up)):
                if self.clock() >= give_up:
                    log.warning("%s: no ack for round %d update", self.device_id, round_idx)
                    return "unacknowledged"
                sender.publish_manifest()  # the server may have restarted: announce again
                sender.resend(range(len(sender.manifest.chunks)), count=False)
        finally:
            sender.close()
        ack = self.acks.pop(sha)
        if ack.rejected:
            log.warning("%s: update rejected: %s: %s", self.device_id, ack.error, ack.reason)
        return ack.status
