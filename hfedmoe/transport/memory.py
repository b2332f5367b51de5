"""In-memory hub and transport: a broker twin for unit tests (wildcards, retain, last will,
shared subscriptions dealt round-robin like Mosquitto's).

:meth:`MemoryTransport.drop` simulates a lost connection (the last will fires, messages sent
while offline are lost, subscriptions survive like a persistent session) and
:meth:`MemoryTransport.reconnect` brings it back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from hfedmoe.errors import TransportError
from hfedmoe.transport.base import Message, Transport, topic_matches


class MemoryHub:
    """The in-process "broker": routes publishes to every connected matching transport."""

    def __init__(self) -> None:
        self._clients: list[MemoryTransport] = []
        self._retained: dict[str, Message] = {}
        self._lock = threading.Lock()
        self.drop_filter: Callable[[Message], bool] | None = None  # tests: return True to lose
        self._turns: dict[str, int] = {}  # shared subscription group -> messages dealt

    def connect(self, client_id: str = "", will: tuple[str, bytes] | None = None) -> MemoryTransport:
        client = MemoryTransport(self, client_id, will)
        with self._lock:
            self._clients.append(client)
        return client

    def _route(self, message: Message) -> None:
        if self.drop_filter is not None and self.drop_filter(message):
            return
        with self._lock:
            if message.retain:
                if message.payload:
                    self._retained[message.topic] = message
                else:
                    self._retained.pop(message.topic, None)
            clients = list(self._clients)
        delivered = Message(message.topic, message.payload, message.qos, False)
        groups: dict[str, list[MemoryTransport]] = {}  # shared subscriptions: one member each
        for client in clients:
            if not client.online:
                continue
            direct = False
            for f in client.filters():
                if not topic_matches(f, message.topic):
                    continue
                if f.startswith("$share/"):
                    groups.setdefault(f.split("/", 2)[1], []).append(client)
                else:
                    direct = True
            if direct:
                client._enqueue(delivered)
        for group, members in sorted(groups.items()):
            with self._lock:
                turn = self._turns.get(group, 0)
                self._turns[group] = turn + 1
            members[turn % len(members)]._enqueue(delivered)

    def _retained_for(self, topic_filter: str) -> list[Message]:
        with self._lock:
            return [m for t, m in self._retained.items() if topic_matches(topic_filter, t)]

    def _remove(self, client: MemoryTransport) -> None:
        with self._lock:
            if client in self._clients:
                self._clients.remove(client)


class MemoryTransport(Transport):
    """A :class:`Transport` attached to a :class:`MemoryHub`."""

    def __init__(self, hub: MemoryHub, client_id: str = "",
                 will: tuple[str, bytes] | None = None) -> None:
        super().__init__()
        self.hub, self.client_id, self.will = hub, client_id, will
        self.online = True
        self._closed = False

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        if self._closed:
            raise TransportError("transport is closed")
        if not self.online:
            return  # like a QoS 0 send on a dead socket; the chunk protocol recovers
        self.hub._route(Message(topic, bytes(payload), qos, retain))

    def _do_subscribe(self, topic_filter: str, qos: int) -> None:
        if topic_filter.startswith("$share/"):
            return  # a broker sends no retained messages to shared subscriptions
        for message in self.hub._retained_for(topic_filter):
            self._enqueue(message)

    def _do_unsubscribe(self, topic_filter: str) -> None:
        pass

    def drop(self) -> None:
        """Lose the connection abnormally: the last will is published."""
        self.online = False
        if self.will is not None:
            self.hub._route(Message(self.will[0], self.will[1], 1, True))

    def reconnect(self) -> None:
        self.online = True

    def close(self) -> None:
        self._closed = True
        self.online = False
        self.hub._remove(self)
