"""MQTT session takeover by client id, against a real Mosquitto run with the kit's config: by
default a device that sends another device's client id disconnects it (and reads none of its
messages); with ``pin_client_ids`` the broker replaces the client id with the account, so the
other device stays connected."""

from __future__ import annotations

import dataclasses
import time

import pytest

from hfedmoe.transport.mqtt import MqttTransport
from hfedmoe.transport.topics import Topics
from tests.hfedmoe.transport.conftest import make_mosquitto

pytestmark = [pytest.mark.broker, pytest.mark.timeout(60)]


def _pump(transports, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for t in transports:
            t.pump(timeout=0.01)


def _attempt(root, pin: bool) -> tuple[int, list, list]:
    """dev1 online as client id "dev1"; dev2's certificate connects as "dev1"; then the server
    acks dev1. (dev1's connects, what dev1 got, what the impostor got)."""
    broker = make_mosquitto(root, pin_client_ids=pin).start()
    topics = Topics("run")
    opened = []
    try:
        server = broker.connect("server", "server")
        slow = dataclasses.replace(broker.cfg("dev1"), reconnect_min=5.0, reconnect_max=5.0)
        dev1 = MqttTransport(slow, "dev1")
        opened += [server, dev1]
        got1: list = []
        dev1.subscribe(topics.ack("dev1"), lambda m: got1.append(m.payload))
        assert dev1.wait_subscribed(5)
        thief = MqttTransport(broker.cfg("dev2"), "dev1")  # another account, dev1's client id
        opened.append(thief)
        stolen: list = []
        thief.subscribe(topics.ack("dev1"), lambda m: stolen.append(m.payload))
        _pump([dev1, thief], 1.0)
        server.publish(topics.ack("dev1"), b"for-dev1")
        _pump([dev1, thief, server], 1.0)
        return dev1.connects, got1, stolen
    finally:
        for t in opened:
            t.close()
        broker.stop()


def test_pinned_client_ids_keep_the_other_device_connected(tmp_path):
    connects, got, stolen = _attempt(tmp_path, pin=True)
    assert connects == 1 and got == [b"for-dev1"] and stolen == []
    conf = (tmp_path / "broker" / "mosquitto.conf").read_text()
    assert "use_username_as_clientid true" in conf


def test_without_pinning_a_reused_client_id_disconnects_the_device_but_reads_nothing(tmp_path):
    connects, got, stolen = _attempt(tmp_path, pin=False)
    assert stolen == []  # the ACL keys on the certificate's account, not the client id
    assert got == []  # dev1 was disconnected (it reconnects only after 5 s)
    assert connects == 1
