"""The transport interface: publish bytes, subscribe handlers, pump a queue on the owner's thread.

Network callbacks (paho's thread, or a publisher in memory) only *enqueue*; handlers run when
the owner calls :meth:`Transport.pump`, so decoding, training and aggregation never happen on a
network thread. Topic filters follow MQTT rules (``+`` one level, ``#`` the rest), matched with
paho's pure ``topic_matches_sub`` so every implementation behaves like a broker.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from paho.mqtt.client import topic_matches_sub

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Message:
    """One received message."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False


Handler = Callable[[Message], None]


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching (``+``/``#``), identical to a broker's; a shared subscription
    ``$share/{group}/{filter}`` matches what ``filter`` matches."""
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2] if topic_filter.count("/") >= 2 else ""
    return bool(topic_matches_sub(topic_filter, topic))


class Transport(ABC):
    """Publish/subscribe over bytes. Subclasses implement the four ``_do_*``/``publish`` methods.

    Handlers are registered per filter; a message is dispatched to every handler whose filter
    matches its topic, on the thread that calls :meth:`pump`.
    """

    def __init__(self) -> None:
        self._inbox: queue.Queue[Message] = queue.Queue()
        self._handlers: dict[str, list[Handler]] = {}
        self._lock = threading.Lock()

    # -- implemented by subclasses ---------------------------------------------------------
    @abstractmethod
    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Send ``payload`` to ``topic`` (non-blocking; QoS 1 retries are the transport's job)."""

    @abstractmethod
    def _do_subscribe(self, topic_filter: str, qos: int) -> None: ...

    @abstractmethod
    def _do_unsubscribe(self, topic_filter: str) -> None: ...

    @abstractmethod
    def close(self) -> None:
        """Disconnect cleanly (no last will) and release resources."""

    # -- shared behaviour ------------------------------------------------------------------
    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Deliver messages matching ``topic_filter`` to ``handler`` (during :meth:`pump`)."""
        with self._lock:
            first = topic_filter not in self._handlers
            self._handlers.setdefault(topic_filter, []).append(handler)
        if first:
            self._do_subscribe(topic_filter, qos)

    def unsubscribe(self, topic_filter: str, handler: Handler | None = None) -> None:
        """Remove ``handler`` (or all handlers) for ``topic_filter``."""
        with self._lock:
            handlers = self._handlers.get(topic_filter, [])
            if handler is not None and handler in handlers:
                handlers.remove(handler)
            if handler is None or not handlers:
                self._handlers.pop(topic_filter, None)
                last = True
            else:
                last = False
        if last:
            self._do_unsubscribe(topic_filter)

    def wait_subscribed(self, timeout: float = 5.0) -> bool:
        """Block until the broker acknowledged every subscription (immediate in memory)."""
        return True

    def filters(self) -> list[str]:
        with self._lock:
            return list(self._handlers)

    def _enqueue(self, message: Message) -> None:
        """Called from the network side; never does work besides queueing."""
        self._inbox.put(message)

    def pending(self) -> int:
        return self._inbox.qsize()

    def pump(self, timeout: float = 0.0, max_messages: int | None = None) -> int:
        """Dispatch queued messages to handlers on this thread; wait up to ``timeout`` for one.

        Returns the number of messages dispatched.
        """
        count = 0
        block = timeout > 0
        while max_messages is None or count < max_messages:
            try:
                message = self._inbox.get(block=block, timeout=timeout if block else None)
            except queue.Empty:
                break
            block = False
            count += 1
            with self._lock:
                targets = [h for f, hs in self._handlers.items() if topic_matches(f, message.topic)
                           for h in hs]
            for handler in targets:
                try:
                    handler(message)
                except Exception:  # a bad handler must not stop the pump
                    log.exception("handler for %s failed", message.topic)
        return count

    def run_until(self, predicate: Callable[[], bool], timeout: float,
                  tick: Callable[[], None] | None = None, step: float = 0.05) -> bool:
        """Pump until ``predicate()`` is true or ``timeout`` seconds pass; call ``tick`` between."""
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.pump(timeout=min(step, left))
            if tick is not None:
                tick()
        return True

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
