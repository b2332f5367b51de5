"""Shared fixtures: a kit-configured Mosquitto on a free port, the embedded broker, the memory
hub, and a manual clock."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from hfedmoe.transport.base import Transport
from hfedmoe.transport.broker import EmbeddedBroker, free_port
from hfedmoe.transport.broker_config import BrokerFiles, write_mosquitto_config
from hfedmoe.transport.certs import CertBundle, make_certs
from hfedmoe.transport.config import TransportConfig
from hfedmoe.transport.memory import MemoryHub
from hfedmoe.transport.mqtt import MqttTransport
from tests.broker_required import MOSQUITTO, need_mosquitto

DEVICES = ["dev1", "dev2"]


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"mosquitto did not open port {port}")


@dataclass
class Mosquitto:
    """One mosquitto process run with the kit's generated config; stopped by PID."""

    files: BrokerFiles
    certs: CertBundle
    proc: subprocess.Popen | None = None

    def start(self) -> Mosquitto:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.files.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_port(self.files.tls_port or self.files.plain_port)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def cfg(self, account: str, *, tls: bool = True, cert: bool = True,
            password: str | None = None, cert_of: str | None = None, **kw) -> TransportConfig:
        """``account``'s config; ``cert_of`` presents another account's certificate (with
        ``account`` as the username), as a client trying to pass for someone else would."""
        pair = self.certs.clients.get(cert_of or account)
        url = f"mqtts://127.0.0.1:{self.files.tls_port}" if tls \
            else f"mqtt://127.0.0.1:{self.files.tls_port}"
        return TransportConfig(
            url=url, ca_cert=str(self.certs.ca.cert) if tls else "",
            client_cert=str(pair.cert) if cert and tls and pair else "",
            client_key=str(pair.key) if cert and tls and pair else "",
            username=account,
            password=password if password is not None
            else self.files.credentials.get(account, ""),
            reconnect_min=0.1, reconnect_max=0.5, connect_timeout=5.0, **kw)

    def connect(self, account: str, client_id: str | None = None, **kw) -> MqttTransport:
        return MqttTransport(self.cfg(account, **kw), client_id or f"{account}-client")


def make_mosquitto(root: Path, persistence: bool = False,
                   pin_client_ids: bool = False) -> Mosquitto:
    need_mosquitto()  # skips, or fails under HFEDMOE_REQUIRE_BROKER=1
    certs = make_certs(root / "pki", DEVICES)
    files = write_mosquitto_config(
        root / "broker", DEVICES, certs=certs, tls_port=free_port(), bind="127.0.0.1",
        persistence_dir=(root / "data") if persistence else None,
        pin_client_ids=pin_client_ids)
    return Mosquitto(files, certs)


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory) -> Iterator[Mosquitto]:
    broker = make_mosquitto(tmp_path_factory.mktemp("mosquitto")).start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def amqtt_broker() -> Iterator[EmbeddedBroker]:
    broker = EmbeddedBroker().start()
    yield broker
    broker.stop()


@dataclass
class Net:
    """A way to open transports for ``server`` and device accounts on one backend."""

    name: str
    open: Callable[[str, str], Transport]  # (account, client_id) -> transport
    opened: list[Transport]

    def connect(self, account: str, client_id: str) -> Transport:
        t = self.open(account, client_id)
        self.opened.append(t)
        return t


@pytest.fixture(params=["memory", "amqtt", pytest.param("mosquitto", marks=pytest.mark.broker)])
def net(request) -> Iterator[Net]:
    name = request.param
    if name == "memory":
        hub = MemoryHub()
        net = Net(name, lambda account, cid: hub.connect(cid), [])
    elif name == "amqtt":
        broker = request.getfixturevalue("amqtt_broker")
        cfg = TransportConfig(url=broker.url, reconnect_max=0.5)
        net = Net(name, lambda account, cid: MqttTransport(cfg, cid), [])
    else:
        mq = request.getfixturevalue("mosquitto")
        net = Net(name, lambda account, cid: mq.connect(account, cid), [])
    yield net
    for t in net.opened:
        t.close()


__all__ = ["ManualClock", "Mosquitto", "Net", "make_mosquitto", "replace"]
