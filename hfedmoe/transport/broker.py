"""Zero-setup broker: amqtt started in-process on loopback, on its own asyncio loop in a thread.

Used when no broker URL is configured. Production uses Mosquitto (or any MQTT broker) by URL;
see :mod:`hfedmoe.transport.broker_config`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading

from hfedmoe.errors import TransportError

log = logging.getLogger(__name__)
for _noisy in ("amqtt", "transitions"):  # per-connection INFO lines drown a demo's output
    logging.getLogger(_noisy).setLevel(logging.WARNING)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedBroker:
    """An amqtt broker on ``host:port`` (anonymous, loopback by default)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port or free_port(host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        from amqtt.broker import Broker  # heavy import, only when the broker is wanted

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin":
                        {"allow_anonymous": True}},
        }
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        errors: list[BaseException] = []

        async def boot() -> None:
            try:
                self._broker = Broker(config, loop=self._loop)
                await self._broker.start()
            except BaseException as exc:  # reported to the caller below
                errors.append(exc)
            finally:
                ready.set()

        def run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            self._loop.create_task(boot())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="hfedmoe-embedded-broker", daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or errors:
            self.stop()
            raise TransportError(f"embedded broker failed to start on {self.url}: "
                                 f"{errors[0] if errors else 'timeout'}")
        log.info("embedded MQTT broker on %s", self.url)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the broker: listeners closed, client connections dropped, loop thread joined."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if self._broker is not None and loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(self._halt(timeout), loop)
            try:
                fut.result(timeout + 2)
            except Exception as exc:  # stopping anyway
                log.warning("embedded broker shutdown: %r", exc)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if not loop.is_running():
            loop.close()
        self._loop = self._thread = self._broker = None

    async def _halt(self, timeout: float) -> None:
        broker = self._broker
        # Free the port and drop clients first, so shutdown cannot hang on a busy connection.
        for server in list(getattr(broker, "_servers", {}).values()):
            if getattr(server, "instance", None) is not None:
                server.instance.close()
        for _session, handler in list(getattr(broker, "_sessions", {}).values()):
            writer = getattr(getattr(handler, "writer", None), "_writer", None)
            if writer is not None:
                writer.transport.abort()
        try:
            await asyncio.wait_for(broker.shutdown(), timeout)
        except Exception as exc:  # amqtt may complain about half-closed sessions
            log.debug("embedded broker shutdown: %r", exc)
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
