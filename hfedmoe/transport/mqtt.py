"""The paho-mqtt (2.x) transport: the only module that talks to a broker.

QoS 1, persistent sessions with stable client ids (MQTT 3.1.1 ``clean_session=False``; MQTT 5
``clean_start=False`` + session expiry), reconnect with backoff on paho's network thread, a
retained last will (status ``offline``), TLS with client certificates and username/password
when configured, and every subscription re-sent on each (re)connect. Callbacks only enqueue.

On the kit's Mosquitto config the TLS listener takes the account from the client certificate's
CN and ignores a username/password sent with it, so ``username``/``password`` may stay empty;
a username that differs from the certificate's CN is logged (it is not the identity used).
"""

from __future__ import annotations

import logging
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from hfedmoe.errors import TransportError
from hfedmoe.protocol import DeviceStatus
from hfedmoe.transport.base import Message, Transport
from hfedmoe.transport.config import TransportConfig, parse_url

log = logging.getLogger(__name__)


def status_payload(state: str) -> bytes:
    return DeviceStatus(state).to_bytes()


class MqttTransport(Transport):
    """A :class:`Transport` over a real broker.

    Args:
        cfg: broker URL, TLS and credentials, session and reconnect settings.
        client_id: stable id (the broker keys the persistent session on it).
        status_topic: if given, ``online`` is published there (retained) on every connect and
            the last will publishes ``offline``.
    """

    def __init__(self, cfg: TransportConfig, client_id: str,
                 status_topic: str | None = None, persistent: bool = True) -> None:
        super().__init__()
        if not cfg.url:
            raise TransportError("MqttTransport needs a broker url (see transport.connect)")
        self.cfg, self.client_id, self.status_topic = cfg, client_id, status_topic
        self.persistent = persistent  # False: a clean session (nothing queued while away)
        self.address = parse_url(cfg.url)
        self._connected = threading.Event()
        self._failure: str | None = None
        self._subs: dict[str, int] = {}
        self._sub_pending: set[int] = set()
        self._sub_acked: set[int] = set()
        self._sub_mids: dict[int, str] = {}  # SUBSCRIBE message id -> its filter
        self.refused: list[str] = []  # filters the broker refused in its SUBACK
        self._sub_lock = threading.Lock()
        self._closed = False
        self.connects = 0
        v5 = cfg.protocol == "5"
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else not persistent)
        c = self._client
        c.reconnect_delay_set(cfg.reconnect_min, cfg.reconnect_max)
        c.max_inflight_messages_set(cfg.max_inflight)
        c.max_queued_messages_set(0)
        if status_topic:
            c.will_set(status_topic, status_payload("offline"), qos=1, retain=True)
        if self.address.tls or cfg.ca_cert:
            c.tls_set(ca_certs=cfg.ca_cert or None, certfile=cfg.client_cert or None,
                      keyfile=cfg.client_key or None)
        if cfg.username:
            c.username_pw_set(cfg.username, cfg.password or None)
            if cfg.client_cert:
                _check_identity(cfg)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        self._connect()

    # -- paho callbacks (network thread): bookkeeping and enqueueing only ------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if reason_code.is_failure:
            self._failure = str(reason_code)
            log.warning("%s: broker refused connection: %s", self.client_id, reason_code)
            self._connected.set()
            return
        self._failure = None
        self.connects += 1
        for topic_filter, qos in list(self._subs.items()):
            self._track(client.subscribe(topic_filter, qos), topic_filter)
        if self.status_topic:
            client.publish(self.status_topic, status_payload("online"), qos=1, retain=True)
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        self._connected.clear()
        if not self._closed:
            log.info("%s: disconnected (%s), reconnecting", self.client_id, reason_code)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # noqa: ANN001
        if any(rc.is_failure for rc in reason_codes):
            # e.g. a NATS node that could not create the subscription's consumer in time:
            # nothing will arrive on it, so say so (the device or server would wait forever)
            with self._sub_lock:
                topic_filter = self._sub_mids.get(mid, f"message {mid}")
                self.refused.append(topic_filter)
            log.error("%s: the broker refused the subscription to %s (%s): nothing will "
                      "arrive on it", self.client_id, topic_filter,
                      ", ".join(str(rc) for rc in reason_codes))
        with self._sub_lock:  # the SUBACK may beat _track to the lock
            self._sub_mids.pop(mid, None)
            if mid in self._sub_pending:
                self._sub_pending.discard(mid)
            else:
                self._sub_acked.add(mid)

    def _track(self, result: tuple[int, int | None], topic_filter: str) -> None:
        rc, mid = result
        if rc == mqtt.MQTT_ERR_SUCCESS and mid is not None:
            with self._sub_lock:
                if mid in self._sub_acked:
                    self._sub_acked.discard(mid)
                else:
                    self._sub_pending.add(mid)
                    self._sub_mids[mid] = topic_filter

    def wait_subscribed(self, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._sub_lock:
                if not self._sub_pending and self.connected:
                    return True
            time.sleep(0.01)
        return False

    def _on_message(self, client, userdata, msg) -> None:  # noqa: ANN001
        self._enqueue(Message(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain)))

    # -- connection -------------------------------------------------------------------------
    def _connect(self) -> None:
        kwargs: dict = {}
        if self.cfg.protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.cfg.session_expiry if self.persistent else 0
            kwargs = {"clean_start": not self.persistent, "properties": props}
        try:
            self._client.connect_async(self.address.host, self.address.port,
                                       keepalive=self.cfg.keepalive, **kwargs)
        except (OSError, ValueError) as exc:
            raise TransportError(f"cannot connect to {self.cfg.url}: {exc}") from exc
        self._client.loop_start()
        if not self._connected.wait(self.cfg.connect_timeout) or self._failure:
            why = self._failure or f"no CONNACK within {self.cfg.connect_timeout}s"
            self._closed = True
            self._client.loop_stop()
            self._client.disconnect()
            raise TransportError(f"{self.client_id}: cannot connect to {self.cfg.url}: {why}")

    @property
    def connected(self) -> bool:
        return self._connected.is_set() and self._failure is None

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout) and self._failure is None

    # -- Transport --------------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        if self._closed:
            raise TransportError("transport is closed")
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise TransportError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")

    def publish_wait(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                     timeout: float = 30.0) -> None:
        """Publish and block until the broker acknowledged it (PUBACK for QoS 1)."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as exc:
            raise TransportError(f"publish to {topic} failed: {exc}") from exc
        if not info.is_published():
            raise TransportError(f"publish to {topic} not acknowledged within {timeout}s")

    def _do_subscribe(self, topic_filter: str, qos: int) -> None:
        self._subs[topic_filter] = qos
        self._track(self._client.subscribe(topic_filter, qos), topic_filter)  # NO_CONN: re-sent

    def _do_unsubscribe(self, topic_filter: str) -> None:
        self._subs.pop(topic_filter, None)
        self._client.unsubscribe(topic_filter)

    def close(self) -> None:
        if self._closed:
            return
        if self.status_topic and self.connected:
            try:
                self.publish_wait(self.status_topic, status_payload("offline"), retain=True,
                                  timeout=2.0)
            except TransportError:
                pass
        self._closed = True
        self._client.disconnect()
        self._client.loop_stop()


def _check_identity(cfg: TransportConfig) -> None:
    """Log when ``username`` is not the client certificate's CN (the broker uses the CN)."""
    try:
        from hfedmoe.transport.certs import cert_identity

        cn = cert_identity(cfg.client_cert)
    except Exception as exc:  # unreadable here: TLS setup reports it
        log.debug("cannot read the CN of %s: %r", cfg.client_cert, exc)
        return
    if cn != cfg.username:
        log.warning("transport.username %r is not the client certificate's CN %r: a broker that "
                    "takes the identity from the certificate (the kit's config) logs you in "
                    "as %r", cfg.username, cn, cn)


def open_transport(cfg: TransportConfig, client_id: str, status_topic: str | None = None,
                   ) -> tuple[MqttTransport, object | None]:
    """Connect per ``cfg``; with no URL, start an :class:`EmbeddedBroker` first (zero setup).

    Returns:
        ``(transport, broker)``; ``broker`` is None unless one was started (stop it after
        closing the transport).
    """
    from dataclasses import replace

    from hfedmoe.transport.broker import EmbeddedBroker

    broker = None
    if not cfg.url:
        broker = EmbeddedBroker().start()
        cfg = replace(cfg, url=broker.url)
    try:
        return MqttTransport(cfg, client_id, status_topic), broker
    except TransportError:
        if broker is not None:
            broker.stop()
        raise
