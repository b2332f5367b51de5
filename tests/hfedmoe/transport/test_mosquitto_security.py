"""Against a real Mosquitto run with the kit's generated config: TLS, auth, ACL, big transfers."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from hfedmoe.errors import TransportError
from hfedmoe.transport.chunks import BlobReceiver, send_blob, sha256
from hfedmoe.transport.mqtt import MqttTransport
from hfedmoe.transport.topics import Topics

pytestmark = [pytest.mark.broker, pytest.mark.timeout(60)]


def _collect(transport, topic_filter: str) -> list[tuple[str, bytes]]:
    seen: list[tuple[str, bytes]] = []
    transport.subscribe(topic_filter, lambda m: seen.append((m.topic, m.payload)))
    assert transport.wait_subscribed(5)
    return seen


def _pump_until(transports, predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for t in transports:
            t.pump(timeout=0.01)
        if predicate():
            return True
    return False


def _tag() -> str:
    return uuid.uuid4().hex[:8]


def test_tls_with_client_cert_connects(mosquitto):
    t = mosquitto.connect("dev1", f"dev1-{_tag()}")
    try:
        assert t.connected
    finally:
        t.close()


@pytest.mark.parametrize("kw", [
    dict(tls=False),  # plain MQTT to the TLS-only listener
    dict(cert=False),  # TLS without a client certificate
    dict(cert=False, password="wrong"),  # a password alone is no identity
])
def test_refused(mosquitto, kw):
    cfg = mosquitto.cfg("dev1", **kw)
    cfg = type(cfg)(**{**cfg.__dict__, "connect_timeout": 2.0})
    with pytest.raises(TransportError):
        MqttTransport(cfg, f"dev1-{_tag()}")


def test_certificate_of_another_ca_refused(mosquitto, tmp_path):
    from dataclasses import replace

    from hfedmoe.transport.certs import make_certs

    foreign = make_certs(tmp_path, ["dev1"]).clients["dev1"]  # right CN, wrong CA
    cfg = replace(mosquitto.cfg("dev1"), client_cert=str(foreign.cert),
                  client_key=str(foreign.key), connect_timeout=2.0)
    with pytest.raises(TransportError):
        MqttTransport(cfg, f"dev1-{_tag()}")


def test_device_cannot_touch_another_devices_topics(mosquitto):
    topics = Topics(f"run-{_tag()}")
    server = mosquitto.connect("server", f"server-{_tag()}")
    dev1 = mosquitto.connect("dev1", f"dev1-{_tag()}")
    dev2 = mosquitto.connect("dev2", f"dev2-{_tag()}")
    try:
        server_sees = _collect(server, f"{topics.base}/#")
        dev2_sees = _collect(dev2, topics.ack_tree("dev2"))
        dev1_sees = _collect(dev1, topics.ack_tree("dev2"))  # spying on dev2's acks
        dev1_own = _collect(dev1, topics.ack_tree("dev1"))
        dev1_spy_updates = _collect(dev1, f"{topics.base}/update/dev2/#")
        # dev1 forges messages into dev2's topics: the broker drops them
        dev1.publish(f"{topics.update('dev2', '0' * 64).prefix}/manifest", b"forged")
        dev1.publish(topics.status("dev2"), b"forged")
        dev1.publish(topics.register("dev2"), b"forged")
        dev1.publish(topics.ack("dev2"), b"forged")
        dev1.publish(topics.round(), b"forged")  # devices cannot announce rounds either
        dev1.publish(topics.register("dev1"), b"marker")  # allowed, sent last
        # the server writes to dev2's ack and dev2 writes its update: dev1 must see neither
        server.publish(topics.ack("dev2"), b"for-dev2")
        dev2.publish(f"{topics.update('dev2', '1' * 64).prefix}/manifest", b"dev2-own")
        server.publish(topics.ack("dev1"), b"for-dev1")
        everyone = [server, dev1, dev2]
        assert _pump_until(everyone, lambda: (topics.register("dev1"), b"marker") in server_sees
                           and dev2_sees and dev1_own
                           and any(p == b"dev2-own" for _, p in server_sees))
        _pump_until(everyone, lambda: False, timeout=0.3)
        assert not any(p == b"forged" for _, p in server_sees)
        assert dev2_sees == [(topics.ack("dev2"), b"for-dev2")]
        assert dev1_sees == [] and dev1_spy_updates == []
        assert dev1_own == [(topics.ack("dev1"), b"for-dev1")]
    finally:
        for t in (server, dev1, dev2):
            t.close()


def test_devices_read_broadcasts(mosquitto):
    topics = Topics(f"run-{_tag()}")
    server = mosquitto.connect("server", f"server-{_tag()}")
    dev1 = mosquitto.connect("dev1", f"dev1-{_tag()}")
    try:
        seen = _collect(dev1, topics.round())
        models = _collect(dev1, topics.all_models())
        server.publish(topics.round(), b'{"round": 1}')
        server.publish(f"{topics.model('a' * 64).prefix}/manifest", b"m")
        assert _pump_until([dev1], lambda: seen and models)
    finally:
        server.close()
        dev1.close()


def test_status_online_then_offline(mosquitto):
    topics = Topics(f"run-{_tag()}")
    server = mosquitto.connect("server", f"server-{_tag()}")
    dev1 = MqttTransport(mosquitto.cfg("dev1"), f"dev1-{_tag()}", status_topic=topics.status("dev1"))
    try:
        seen = _collect(server, topics.all_status())
        assert _pump_until([server], lambda: seen and b"online" in seen[-1][1])
        dev1.close()
        assert _pump_until([server], lambda: b"offline" in seen[-1][1])
    finally:
        server.close()
        dev1.close()


def test_mqtt5_and_persistent_session(mosquitto):
    topics = Topics(f"run-{_tag()}")
    cid = f"dev1-{_tag()}"
    server = mosquitto.connect("server", f"server-{_tag()}")
    dev1 = MqttTransport(mosquitto.cfg("dev1", protocol="5"), cid)
    try:
        _collect(dev1, topics.ack("dev1"))
        dev1.close()
        server.publish(topics.ack("dev1"), b"while-you-were-away")  # queued in the session
        time.sleep(0.2)
        dev1 = MqttTransport(mosquitto.cfg("dev1", protocol="5"), cid)
        seen: list = []
        dev1.subscribe(topics.ack("dev1"), lambda m: seen.append(m.payload))
        assert _pump_until([dev1], lambda: b"while-you-were-away" in seen)
    finally:
        server.close()
        dev1.close()


@pytest.mark.timeout(90)
def test_50mb_update_arrives_intact(mosquitto):
    topics = Topics(f"run-{_tag()}")
    server = mosquitto.connect("server", f"server-{_tag()}")
    dev1 = mosquitto.connect("dev1", f"dev1-{_tag()}")
    try:
        got: dict[str, bytes] = {}
        recv = BlobReceiver(server, topics.all_updates(), lambda p, b: got.setdefault(p, b),
                            request_topic=topics.update_request_for, retry_after=2.0)
        assert server.wait_subscribed(5)
        blob = os.urandom(50 * 1000 * 1000)
        sender = send_blob(dev1, topics.update("dev1", sha256(blob)), blob)
        assert server.run_until(lambda: got, 60, tick=lambda: (recv.poll(), dev1.pump()))
        assert got[sender.topics.prefix] == blob
        sender.close()
    finally:
        server.close()
        dev1.close()
