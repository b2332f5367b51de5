"""An N-node NATS cluster with MQTT 3.1.1 on every node, for tests that run the kit across a
broker cluster (docs/deployment.md, "On a NATS cluster").

Each node gets a config file written here, a JetStream store in a directory of its own, and
free loopback ports (client, cluster route, MQTT); every node is stopped by its PID. Without a
``nats-server`` binary the test is skipped (or fails under ``HFEDMOE_REQUIRE_BROKER=1``, as the
Mosquitto tests do: :mod:`tests.broker_required`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hfedmoe.transport.broker import free_port
from tests.broker_required import skip_or_fail

# HFEDMOE_NATS_SERVER: another binary (e.g. a newer release than the distribution's)
NATS_SERVER = (os.environ.get("HFEDMOE_NATS_SERVER") or shutil.which("nats-server")
               or "/usr/sbin/nats-server")
# above the kit's largest single message: one update of transport.chunk_size (1 MiB) plus its
# manifest, or a model shard (NATS refuses larger messages; its default is 1 MB)
MAX_PAYLOAD = "8MB"
# NATS backs every QoS 1 subscription with a JetStream consumer. Replicated (the default in a
# cluster) and on disk, a burst of a few hundred connecting devices times their creation out
# (the SUBACK then refuses the filter); one replica in memory takes 200 devices in about 1 s.
# The streams (sessions, retained messages, QoS 1 messages) stay replicated.
MQTT_CONSUMERS = "consumer_replicas: 1, consumer_memory_storage: true"


@dataclass(frozen=True)
class NatsNode:
    name: str
    client_port: int
    cluster_port: int
    mqtt_port: int
    store_dir: Path
    config: Path
    log: Path

    @property
    def url(self) -> str:
        """The node's MQTT listener, as ``transport.url`` takes it."""
        return f"mqtt://127.0.0.1:{self.mqtt_port}"


def need_nats_server() -> str:
    """The nats-server binary's path; skips (or fails where brokers are required) without one."""
    if not Path(NATS_SERVER).exists():
        skip_or_fail(f"nats-server binary not installed ({NATS_SERVER}; apt-get install "
                     f"nats-server)")
    return NATS_SERVER


def node_config(node: NatsNode, routes: list[int], cluster: str = "hfedmoe") -> str:
    """The nats-server config of one node: JetStream (MQTT needs it), a route to every other
    node, MQTT on its own port with its subscriptions' consumers in memory."""
    route_list = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in routes)
    return (f'server_name: "{node.name}"\n'
            f"listen: 127.0.0.1:{node.client_port}\n"
            f"max_payload: {MAX_PAYLOAD}\n"
            f'jetstream {{ store_dir: "{node.store_dir}" }}\n'
            f'cluster {{ name: "{cluster}", listen: 127.0.0.1:{node.cluster_port}, '
            f"routes: [{route_list}] }}\n"
            f"mqtt {{ listen: 127.0.0.1:{node.mqtt_port}, {MQTT_CONSUMERS} }}\n")


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _mqtt_ready(node: NatsNode) -> bool:
    """The node accepts an MQTT session: its MQTT listener is up and JetStream has a leader
    (NATS answers CONNECT only once it can create the session's streams)."""
    import paho.mqtt.client as mqtt

    if not _listening(node.mqtt_port):
        return False
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"probe-{node.name}",
                    protocol=mqtt.MQTTv311)
    try:
        c.connect("127.0.0.1", node.mqtt_port, keepalive=10)
        c.loop_start()
        end = time.monotonic() + 5
        while not c.is_connected() and time.monotonic() < end:
            time.sleep(0.05)
        return c.is_connected()
    except OSError:
        return False
    finally:
        c.loop_stop()
        c.disconnect()


@contextmanager
def nats_cluster(root: Path, size: int = 3, timeout: float = 60.0) -> Iterator[list[NatsNode]]:
    """Start ``size`` clustered nats-server nodes under ``root``; yield them once every node
    accepts MQTT sessions; stop each by PID. (JetStream in cluster mode needs routes: at least
    two nodes.)"""
    if size < 2:
        raise ValueError("a NATS cluster needs at least 2 nodes")
    binary = need_nats_server()
    nodes = []
    for i in range(size):
        d = root / f"n{i}"
        d.mkdir(parents=True)
        nodes.append(NatsNode(f"n{i}", free_port(), free_port(), free_port(), d / "js",
                              d / "nats.conf", d / "nats.log"))
    procs: list[subprocess.Popen] = []
    try:
        for node in nodes:
            routes = [n.cluster_port for n in nodes if n is not node]
            node.config.write_text(node_config(node, routes))
            with open(node.log, "w") as log:
                procs.append(subprocess.Popen([binary, "-c", str(node.config)], stdout=log,
                                              stderr=subprocess.STDOUT))
        end = time.monotonic() + timeout
        pending = list(nodes)
        while pending:
            for proc, node in zip(procs, nodes, strict=True):
                if proc.poll() is not None:
                    raise RuntimeError(f"nats-server {node.name} exited with {proc.returncode}: "
                                       f"{node.log.read_text()[-2000:]}")
            pending = [n for n in pending if not _mqtt_ready(n)]
            if pending and time.monotonic() > end:
                raise RuntimeError(f"NATS nodes {[n.name for n in pending]} accept no MQTT "
                                   f"session after {timeout}s")
            time.sleep(0.2 if pending else 0)
        yield nodes
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
