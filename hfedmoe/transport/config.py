"""Transport configuration (a frozen dataclass like the rest of :mod:`hfedmoe.config`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from hfedmoe.errors import ConfigError


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool


def parse_url(url: str) -> BrokerAddress:
    """``mqtt://host[:1883]`` or ``mqtts://host[:8883]`` -> :class:`BrokerAddress`."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"bad broker url {url!r}: {exc}") from exc
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ConfigError(f"broker url must look like mqtt://host:port or mqtts://host:port, "
                          f"got {url!r}")
    tls = parts.scheme == "mqtts"
    return BrokerAddress(parts.hostname, port or (8883 if tls else 1883), tls)


@dataclass(frozen=True)
class TransportConfig:
    """How a device or the server reaches the broker.

    An empty ``url`` means: start the embedded broker on loopback (zero setup).
    """

    url: str = ""
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    keepalive: int = 30
    session_expiry: int = 86400  # MQTT 5: seconds the broker keeps a session after disconnect
    reconnect_min: float = 0.1
    reconnect_max: float = 5.0
    connect_timeout: float = 10.0
    max_inflight: int = 64
    ca_cert: str = ""
    client_cert: str = ""
    client_key: str = ""
    username: str = ""
    password: str = ""
    chunk_size: int = 1 << 20
    retry_after: float = 2.0
    transfer_timeout: float = 300.0

    def __post_init__(self) -> None:
        if self.url:
            parse_url(self.url)
        if self.keepalive < 5:
            raise ConfigError("transport.keepalive must be >= 5")
        if not 0 < self.reconnect_min <= self.reconnect_max:
            raise ConfigError("transport.reconnect_min must be in (0, reconnect_max]")
        if self.max_inflight < 1 or self.chunk_size < 1024 or self.session_expiry < 0:
            raise ConfigError("transport.max_inflight >= 1, chunk_size >= 1024, "
                              "session_expiry >= 0")
        if bool(self.client_cert) != bool(self.client_key):
            raise ConfigError("transport.client_cert and transport.client_key go together")
        if self.password and not self.username:
            raise ConfigError("transport.password needs transport.username")
