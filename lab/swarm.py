"""``hfedmoe swarm``: thousands of protocol-level simulated devices against a live deployment.

Each simulated device is a real MQTT client speaking the kit's protocol, without a model: it
connects with a stable client id and a retained last will, publishes its status, registers with
a device profile's report and a budget drawn from ``--budgets``, and when a round announcement
names it, "trains" for a time drawn from ``--train-s`` and uploads a canned update through the
chunked transfer (:func:`hfedmoe.transport.chunks.send_blob`): real wire-format bytes with as
many experts as its budget, full experts or LoRA factors as the server's ``train.adapter``
says, relative to the round's model hash, so the server validates, spools and aggregates it
exactly as a phone's. It answers resend requests, re-sends until acknowledged, and drops its
connection (abruptly: the broker publishes its last will) and reconnects at ``--dropout``.

One process drives many clients: paho's external-loop API (``loop_read``/``loop_write`` on
sockets watched by one :mod:`selectors` loop), so a device costs a socket and a few kB, not a
thread. ``--processes`` splits the devices over several such processes.

What it reports (one JSON object): registration time (from the swarm's start to each device's
``registered`` ack), announcement fan-out (from the server's ``opened_at`` to each device's
receipt: p50/p99/max, and when the last device had it), update ingest (updates/s and MB/s from
the first upload to the last ack, ack latency, accepted/rejected/late), drops and reconnects, and
RSS and CPU of the processes given by ``--watch name=PID`` (the server, the broker) and of the
swarm itself, and per broker of ``--url`` (the nodes of a cluster) its devices, how many
registered and how many received a round announcement.

Not simulated: model download (devices are assumed to hold the round's model; the broadcast
of model shards is measured by the transport benchmark) and training compute.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import logging
import multiprocessing as mp
import random
import selectors
import socket
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from hfedmoe.errors import ConfigError, ProtocolError
from hfedmoe.protocol import (
    DeviceStatus,
    Done,
    Registered,
    Registration,
    RoundAnnouncement,
    decode_ack,
    decode_round,
)
from hfedmoe.transport.base import Message, Transport
from hfedmoe.transport.chunks import ChunkSender, send_blob
from hfedmoe.transport.config import parse_url
from hfedmoe.transport.topics import Topics, check_id

log = logging.getLogger("hfedmoe.swarm")

_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
_ONLINE, _OFFLINE = DeviceStatus("online").to_bytes(), DeviceStatus("offline").to_bytes()


@dataclass(frozen=True)
class SwarmConfig:
    """One swarm run (the CLI flags of ``hfedmoe swarm``).

    ``url`` is one broker, or the nodes of a broker cluster separated by commas: device ``i``
    connects to the ``i mod n``-th, so the devices spread evenly over the nodes."""

    url: str = "mqtt://127.0.0.1:1883"
    run_id: str = "hfedmoe"
    devices: int = 100
    prefix: str = "swarm"
    processes: int = 1
    rounds: int = 1  # stop after handling this many announcements (0: registration only)
    budgets: tuple[int, int] = (1, 8)  # registered budget, uniform in [lo, hi]
    train_s: tuple[float, float] = (0.5, 2.0)  # simulated training time per round
    examples: tuple[int, int] = (20, 200)
    dropout: float = 0.0  # probability a participant drops its connection during a round
    reconnect_s: float = 2.0
    connect_batch: int = 64  # connection handshakes in flight per process (listen backlog)
    keepalive: int = 120
    persistent: bool = False  # clean_session=False like the agent (leaves sessions behind)
    ack_timeout_s: float = 15.0
    chunk_size: int = 1 << 20
    timeout_s: float = 600.0
    seed: int = 0
    keep_uploads: bool = False  # the report lists every upload (device, round, sha, status)
    config: str = ""  # the server's config file (model, adapter, wire) for canned updates
    overrides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_id(self.run_id, "run id")
        check_id(f"{self.prefix}-0", "device id prefix")
        for url in self.urls:
            parse_url(url)
        if self.devices < 1 or self.processes < 1 or self.rounds < 0:
            raise ConfigError("swarm: devices and processes must be >= 1, rounds >= 0")
        if not 0.0 <= self.dropout <= 1.0:
            raise ConfigError("swarm: dropout is a probability in [0, 1]")
        for lo, hi in (self.budgets, self.train_s, self.examples):
            if not 0 <= lo <= hi:
                raise ConfigError(f"swarm: range {lo}-{hi} must satisfy 0 <= lo <= hi")

    @property
    def urls(self) -> tuple[str, ...]:
        """The brokers (cluster nodes) the devices spread over."""
        return tuple(u.strip() for u in self.url.split(","))


# --- canned updates -----------------------------------------------------------------------------


class UpdateFactory:
    """Wire-format updates of the server's model: ``k`` random experts, full or LoRA factors.

    Built once per swarm process from the server's config (the model is built once to learn its
    shapes; tensors are drawn once per expert and reused), so a device costs an ``encode``."""

    def __init__(self, server_cfg: Any) -> None:
        import torch

        from hfedmoe.data import load_task
        from hfedmoe.lora import FACTOR_PARAMS, factor_keys
        from hfedmoe.models.registry import build_model
        from hfedmoe.names import parse_key

        self.cfg = server_cfg
        task = load_task(server_cfg.data)
        model = build_model(server_cfg.model, server_cfg.data.task, task.num_labels)
        state = model.state()
        self.layers = sorted({e.layer_idx for e in _experts(state)})
        self.experts = sorted(_experts(state), key=lambda e: (e.layer_idx, e.expert_idx))
        self.per_layer = {li: [e for e in self.experts if e.layer_idx == li] for li in self.layers}
        self.lora = server_cfg.train.adapter == "lora"
        g = torch.Generator().manual_seed(0)
        self.tensors: dict[Any, dict[str, Any]] = {}
        for key, t in state.items():
            pk = parse_key(key)
            e = pk.expert
            if e is None:
                continue
            if self.lora:
                if pk.param not in FACTOR_PARAMS or t.dim() != 2:
                    continue
                a, b = factor_keys(key)
                r = server_cfg.train.lora_rank
                self.tensors.setdefault(e, {})[a] = torch.randn(r, t.shape[1], generator=g) * 1e-3
                self.tensors.setdefault(e, {})[b] = torch.randn(t.shape[0], r, generator=g) * 1e-3
            else:
                self.tensors.setdefault(e, {})[key] = torch.randn(t.shape, generator=g) * 1e-5
        del model

    def blob(self, run_id: str, round_idx: int, device: str, base_hash: str, k: int,
             num_examples: int, rng: random.Random) -> tuple[bytes, int]:
        from hfedmoe.update import SparseUpdate, UpdateMeta
        from hfedmoe.wire import encode

        chosen = rng.sample(self.experts, min(k, len(self.experts)))
        deltas = {key: t for e in chosen for key, t in self.tensors[e].items()}
        usage = {e: 1.0 / len(self.per_layer[e.layer_idx]) for e in self.experts}
        update = SparseUpdate(run_id=run_id, round_idx=round_idx, client_id=device,
                              num_examples=num_examples, deltas=deltas, usage=usage,
                              importance=usage, routed=frozenset(self.experts),
                              updated=frozenset(chosen), base_model_hash=base_hash,
                              meta=UpdateMeta(swarm=True, steps=1))
        return encode(update, 0.0, self.cfg.wire), len(chosen)


def _experts(state: dict[str, Any]) -> set:
    from hfedmoe.errors import ModelError
    from hfedmoe.names import parse_key

    out = set()
    for key in state:
        try:
            e = parse_key(key).expert
        except ModelError:
            continue
        if e is not None:
            out.add(e)
    return out


# --- the event loop -----------------------------------------------------------------------------


class _Loop:
    """One :mod:`selectors` loop driving many paho clients (paho's external-loop callbacks)."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.clients: list[mqtt.Client] = []
        self._misc = 0
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._tick = 0

    def attach(self, client: mqtt.Client) -> None:
        client.on_socket_open = self._open
        client.on_socket_close = self._close
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._no_write
        self.clients.append(client)

    def _open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self.sel.register(sock, _READ, client)

    def _close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _want_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        try:
            self.sel.modify(sock, _READ | _WRITE, client)
        except (KeyError, ValueError):
            pass

    def _no_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        try:
            self.sel.modify(sock, _READ, client)
        except (KeyError, ValueError):
            pass

    def later(self, delay: float, fn: Callable[[], None]) -> None:
        self._tick += 1
        heapq.heappush(self._timers, (time.monotonic() + delay, self._tick, fn))

    def turn(self, timeout: float) -> None:
        now = time.monotonic()
        if self._timers:
            timeout = max(0.0, min(timeout, self._timers[0][0] - now))
        for key, mask in self.sel.select(timeout) if self.sel.get_map() else ():
            client = key.data
            if mask & _READ:
                client.loop_read(max_packets=32)
            if mask & _WRITE:
                client.loop_write()
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, fn = heapq.heappop(self._timers)
            fn()
        # keepalive and QoS retries: every client's loop_misc about once a second
        n = len(self.clients)
        if n:
            step = max(1, n // 20)
            for c in self.clients[self._misc:self._misc + step]:
                c.loop_misc()
            self._misc = (self._misc + step) % n


class _DeviceTransport(Transport):
    """The :class:`Transport` a simulated device's chunk sender uses: publishes through its
    paho client; messages are dispatched at once (the loop's thread is the owner's)."""

    def __init__(self, client: mqtt.Client) -> None:
        super().__init__()
        self.client = client
        self.subs: dict[str, int] = {}

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=qos, retain=retain)

    def _do_subscribe(self, topic_filter: str, qos: int) -> None:
        self.subs[topic_filter] = qos
        self.client.subscribe(topic_filter, qos)

    def _do_unsubscribe(self, topic_filter: str) -> None:
        self.subs.pop(topic_filter, None)
        self.client.unsubscribe(topic_filter)

    def close(self) -> None:
        pass

    def _enqueue(self, message: Message) -> None:
        super()._enqueue(message)
        self.pump()


@lru_cache(maxsize=8)
def _round_message(payload: bytes) -> RoundAnnouncement | Done | None:
    """Every device in a process gets the same announcement: read it once (None: malformed)."""
    try:
        return decode_round(payload)
    except ProtocolError:
        return None


@dataclass
class _Device:
    id: str
    index: int
    budget: int
    examples: int
    report: dict[str, Any]
    client: mqtt.Client | None = None
    transport: _DeviceTransport | None = None
    connected: bool = False
    connack_t: float = 0.0
    registered_t: float = 0.0
    registrations: int = 0
    rounds_seen: dict[int, float] = field(default_factory=dict)
    sender: ChunkSender | None = None
    upload: dict[str, Any] | None = None
    drops: int = 0
    reconnects: int = 0


class SwarmProcess:
    """The devices ``[start, end)`` of a swarm on one event loop."""

    def __init__(self, cfg: SwarmConfig, start: int, end: int, t0: float,
                 factory: UpdateFactory | None) -> None:
        from device_agent.profiles import list_profiles, load_profile

        self.cfg, self.t0, self.factory = cfg, t0, factory
        self.topics = Topics(cfg.run_id)
        self.addresses = [parse_url(u) for u in cfg.urls]
        self.loop = _Loop()
        self.rng = random.Random(f"{cfg.seed}:{start}")
        profiles = list_profiles()
        reports = {name: load_profile(name).to_dict() for name in profiles}
        self.devices = []
        for i in range(start, end):
            rng = random.Random(f"{cfg.seed}:device:{i}")
            name = profiles[i % len(profiles)]
            budget = rng.randint(*cfg.budgets)
            examples = rng.randint(*cfg.examples)
            report = {**reports[name], "local_examples": examples,
                      "budget": {"c_budget": budget, "limit": "swarm", "reason": "drawn"},
                      "swarm": True}
            self.devices.append(_Device(f"{cfg.prefix}-{i:05d}", i, budget, examples, report))
        self.announcements: dict[int, RoundAnnouncement] = {}  # round -> its announcement
        self.uploads: list[dict[str, Any]] = []
        self.done = False
        self.handled_rounds: set[int] = set()
        self.errors: list[str] = []
        self._checked = 0.0
        self._connects = self._connacks = 0

    # -- connections -----------------------------------------------------------------------
    def _make_client(self, d: _Device) -> None:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=d.id, protocol=mqtt.MQTTv311,
                        clean_session=not self.cfg.persistent)
        c.will_set(self.topics.status(d.id), _OFFLINE, qos=1, retain=True)
        c.max_inflight_messages_set(64)
        c.user_data_set(d)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        d.client = c
        d.transport = _DeviceTransport(c)
        d.transport.subscribe(self.topics.round(), lambda m, d=d: self._on_round(d, m))
        d.transport.subscribe(self.topics.ack_tree(d.id), lambda m, d=d: self._on_ack(d, m))
        self.loop.attach(c)

    def _connect(self, d: _Device) -> None:
        try:
            address = self.addresses[d.index % len(self.addresses)]
            d.client.connect(address.host, address.port, keepalive=self.cfg.keepalive)
        except OSError as exc:
            self.errors.append(f"{d.id}: connect: {exc}")
            self.loop.later(1.0 + self.rng.random(), lambda: self._connect(d))

    def _on_connect(self, client, d: _Device, flags, reason_code, properties) -> None:  # noqa: ANN001
        if reason_code.is_failure:
            self.errors.append(f"{d.id}: refused: {reason_code}")
            return
        d.connected = True
        if not d.connack_t:
            d.connack_t = time.time()
            self._connacks += 1
        for topic_filter, qos in d.transport.subs.items():
            client.subscribe(topic_filter, qos)
        client.publish(self.topics.status(d.id), _ONLINE, qos=1, retain=True)
        if not d.registered_t:
            self._register(d)

    def _register(self, d: _Device) -> None:
        if d.registered_t or not d.connected:
            return
        d.registrations += 1
        reg = Registration(budget=d.budget, report=d.report, device_id=d.id)
        d.client.publish(self.topics.register(d.id), reg.to_bytes(), qos=1)
        # the agent registers again every 5 s until the server answers
        self.loop.later(5.0, lambda: self._register(d))

    def _on_disconnect(self, client, d: _Device, flags, reason_code, properties) -> None:  # noqa: ANN001
        d.connected = False
        if not self.done:
            self.loop.later(self.cfg.reconnect_s, lambda: self._reconnect(d))

    def _reconnect(self, d: _Device) -> None:
        if d.connected or self.done:
            return
        d.reconnects += 1
        try:
            d.client.reconnect()
        except OSError:
            self.loop.later(self.cfg.reconnect_s, lambda: self._reconnect(d))

    def _drop(self, d: _Device) -> None:
        """Lose the connection without a DISCONNECT: the broker sends the last will."""
        sock = d.client.socket()
        if sock is None or not d.connected:
            return
        d.drops += 1
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- messages ----------------------------------------------------------------------------
    def _on_message(self, client, d: _Device, msg) -> None:  # noqa: ANN001
        d.transport._enqueue(Message(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain)))

    def _on_round(self, d: _Device, message: Message) -> None:
        now = time.time()
        ann = _round_message(message.payload)
        if ann is None:
            return
        if isinstance(ann, Done):
            # a retained "done" is a finished run's (the broker kept it): not this swarm's end
            self.done = self.done or not message.retain
            return
        r = ann.round_idx
        if r in d.rounds_seen:
            return
        d.rounds_seen[r] = now
        self.announcements.setdefault(r, ann)
        if len(self.handled_rounds) < self.cfg.rounds:
            self.handled_rounds.add(r)
        if r not in self.handled_rounds or not ann.takes_part(d.id):
            return
        if ann.deadline <= now:
            return
        train_s = self.rng.uniform(*self.cfg.train_s)
        if self.rng.random() < self.cfg.dropout:
            self.loop.later(self.rng.uniform(0, train_s), lambda: self._drop(d))
        self.loop.later(train_s, lambda: self._send(d, r))

    def _send(self, d: _Device, r: int) -> None:
        if not d.connected:  # dropped: send once it is back
            self.loop.later(0.5, lambda: self._send(d, r))
            return
        ann = self.announcements[r]
        if self.factory is None or time.time() > ann.deadline:
            return
        blob, k = self.factory.blob(self.cfg.run_id, r, d.id, ann.model.state_hash,
                                    d.budget, d.examples, self.rng)
        sha = hashlib.sha256(blob).hexdigest()
        d.upload = {"device": d.id, "round": r, "sha": sha, "bytes": len(blob), "experts": k,
                    "start": time.time(), "ack": 0.0, "status": "", "resends": 0}
        self.uploads.append(d.upload)
        d.sender = send_blob(d.transport, self.topics.update(d.id, sha), blob,
                             chunk_size=self.cfg.chunk_size,
                             whole_max=ann.whole_max_bytes)
        self.loop.later(self.cfg.ack_timeout_s, lambda u=d.upload: self._resend(d, u))

    def _resend(self, d: _Device, upload: dict[str, Any]) -> None:
        if upload["ack"] or d.sender is None or d.upload is not upload:
            return
        if time.time() > self.announcements[upload["round"]].deadline \
                + 3 * self.cfg.ack_timeout_s:
            upload["status"] = "unacknowledged"
            d.sender.close()
            d.sender = None
            return
        if d.connected:
            upload["resends"] += 1
            d.sender.publish_manifest()
            d.sender.resend(range(len(d.sender.manifest.chunks)), count=False)
        self.loop.later(self.cfg.ack_timeout_s, lambda: self._resend(d, upload))

    def _on_ack(self, d: _Device, message: Message) -> None:
        try:
            ack = decode_ack(message.payload)
        except ProtocolError:
            return
        if isinstance(ack, Registered):
            if not d.registered_t:
                d.registered_t = time.time()
        elif d.upload is not None and ack.sha == d.upload["sha"] and not d.upload["ack"]:
            d.upload["ack"] = time.time()
            d.upload["status"] = ack.status
            if d.sender is not None:
                d.sender.close()
                d.sender = None

    # -- run -------------------------------------------------------------------------------------
    def finished(self) -> bool:
        if self.done:
            return True
        now = time.monotonic()
        if now - self._checked < 0.2:
            return False
        self._checked = now
        if not all(d.registered_t for d in self.devices):
            return False
        if self.cfg.rounds == 0:
            return True
        if len(self.handled_rounds) < self.cfg.rounds:
            return False
        last = max(self.handled_rounds)
        if not all(last in d.rounds_seen for d in self.devices if d.connected):
            return False
        pending = [u for u in self.uploads if not u["ack"] and u["status"] != "unacknowledged"]
        if pending:
            return False
        # participants of the last handled round whose upload is still scheduled
        ann = self.announcements[last]
        mine = {d.id for d in self.devices if ann.takes_part(d.id)}
        sent = {u["device"] for u in self.uploads if u["round"] == last}
        return mine <= sent or time.time() > ann.deadline

    def run(self) -> dict[str, Any]:
        for d in self.devices:
            self._make_client(d)
        todo = list(self.devices)
        give_up = time.monotonic() + self.cfg.timeout_s
        timed_out = False
        while not self.finished():
            if time.monotonic() > give_up:
                timed_out = True
                break
            # at most connect_batch handshakes in flight: a full listen queue drops SYNs, and
            # a blocking connect() then stalls every device of this loop for a second
            room = self.cfg.connect_batch - (self._connects - self._connacks)
            if todo and room > 0:
                batch, todo = todo[:room], todo[room:]
                for d in batch:
                    self._connects += 1
                    self._connect(d)
            self.loop.turn(0.0 if todo else 0.05)
        # a short grace period so the last acks/PUBACKs go out, then disconnect cleanly
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            self.loop.turn(0.05)
        self.done = True
        for d in self.devices:
            if d.client is not None and d.connected:
                d.client.publish(self.topics.status(d.id), _OFFLINE, qos=0, retain=True)
                d.client.disconnect()
        end = time.monotonic() + 1.0
        while time.monotonic() < end and self.loop.sel.get_map():
            self.loop.turn(0.05)
        return self._result(timed_out)

    def _result(self, timed_out: bool) -> dict[str, Any]:
        return {
            "timed_out": timed_out,
            "registered": [d.registered_t - self.t0 for d in self.devices if d.registered_t],
            "connected": [d.connack_t - self.t0 for d in self.devices if d.connack_t],
            "registrations": sum(d.registrations for d in self.devices),
            "devices": len(self.devices),
            "announce": {str(r): {"opened_at": float(ann.opened_at),
                                  "participants": len(ann.participants),
                                  "received": [d.rounds_seen[r] for d in self.devices
                                               if r in d.rounds_seen]}
                         for r, ann in self.announcements.items()},
            "uploads": self.uploads,
            "drops": sum(d.drops for d in self.devices),
            "reconnects": sum(d.reconnects for d in self.devices),
            "errors": self.errors[:20],
            "error_count": len(self.errors),
            "by_url": self._by_url(),
        }

    def _by_url(self) -> dict[str, dict[str, int]]:
        """Per broker (cluster node): its devices, how many registered, how many received a
        round announcement."""
        urls = self.cfg.urls
        out = {u: {"devices": 0, "registered": 0, "announced": 0} for u in urls}
        for d in self.devices:
            row = out[urls[d.index % len(urls)]]
            row["devices"] += 1
            row["registered"] += bool(d.registered_t)
            row["announced"] += bool(d.rounds_seen)
        return out


# --- the whole swarm -------------------------------------------------------------------------


def _child(cfg: SwarmConfig, start: int, end: int, t0: float, factory: Any,
           out: Any) -> None:
    try:
        out.put(SwarmProcess(cfg, start, end, t0, factory).run())
    except BaseException as exc:  # the parent reports it
        out.put({"error": f"{type(exc).__name__}: {exc}"})


class _Watch(threading.Thread):
    """Samples RSS and CPU time of named processes while the swarm runs."""

    def __init__(self, pids: dict[str, int], period: float = 0.25) -> None:
        super().__init__(daemon=True)
        import psutil

        self.procs = {}
        for name, pid in pids.items():
            try:
                self.procs[name] = psutil.Process(pid)
            except psutil.Error as exc:
                raise ConfigError(f"--watch {name}={pid}: {exc}") from exc
        self.period = period
        self.stop = threading.Event()
        self.peak: dict[str, float] = {n: 0.0 for n in self.procs}
        self.cpu0 = {n: self._cpu(p) for n, p in self.procs.items()}
        self.cpu1 = dict(self.cpu0)
        self.t0 = time.monotonic()
        self.t1 = self.t0

    @staticmethod
    def _cpu(p: Any) -> float:
        """CPU seconds of ``p`` itself (its children are watched under their own names)."""
        t = p.cpu_times()
        return t.user + t.system

    def run(self) -> None:
        import psutil

        while not self.stop.wait(self.period):
            for name, p in self.procs.items():
                try:
                    self.peak[name] = max(self.peak[name], p.memory_info().rss / 2**20)
                    self.cpu1[name] = self._cpu(p)
                except psutil.Error:
                    continue
            self.t1 = time.monotonic()

    def result(self) -> dict[str, dict[str, float]]:
        wall = max(self.t1 - self.t0, 1e-9)
        return {n: {"rss_peak_mib": round(self.peak[n], 1),
                    "cpu_s": round(self.cpu1[n] - self.cpu0[n], 2),
                    "cpu_pct": round(100 * (self.cpu1[n] - self.cpu0[n]) / wall, 1)}
                for n in self.procs}


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def _summary(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50": round(_pct(values, 50), 4), "p99": round(_pct(values, 99), 4),
            "max": round(max(values), 4), "mean": round(statistics.fmean(values), 4)}


def run_swarm(cfg: SwarmConfig, watch: dict[str, int] | None = None) -> dict[str, Any]:
    """Run the swarm; returns the report (see the module docstring)."""
    factory = None
    if cfg.rounds:
        if not cfg.config:
            raise ConfigError("swarm: uploads need the server's config (--config server.toml) to "
                              "build updates of its model; use --rounds 0 for registration only")
        from hfedmoe.config import load_config
        from server.config import ServerConfig

        server_cfg = load_config(ServerConfig, cfg.config, list(cfg.overrides))
        if server_cfg.run_id != cfg.run_id:
            raise ConfigError(f"swarm: run id {cfg.run_id!r} differs from the server config's "
                              f"{server_cfg.run_id!r}")
        factory = UpdateFactory(server_cfg)
    psutil_self = __import__("psutil").Process()
    watcher = _Watch({"swarm": psutil_self.pid, **(watch or {})})
    t0 = time.time()
    n, p = cfg.devices, min(cfg.processes, cfg.devices)
    bounds = [(i * n // p, (i + 1) * n // p) for i in range(p)]
    if p == 1:
        watcher.start()
        parts = [SwarmProcess(cfg, 0, n, t0, factory).run()]
    else:
        ctx = mp.get_context("fork")  # the children share the factory's tensors
        out = ctx.Queue()
        procs = [ctx.Process(target=_child, args=(cfg, a, b, t0, factory, out), daemon=True)
                 for a, b in bounds]
        for proc in procs:
            proc.start()
        watcher.start()
        parts = [out.get(timeout=cfg.timeout_s + 60) for _ in procs]
        for proc in procs:
            proc.join(10)
    wall = time.time() - t0
    watcher.stop.set()
    watcher.join()
    failed = [x["error"] for x in parts if "error" in x]
    if failed:
        raise ConfigError(f"swarm process failed: {failed[0]}")
    return _merge(cfg, parts, t0, wall, watcher.result())


def _merge(cfg: SwarmConfig, parts: list[dict[str, Any]], t0: float, wall: float,
           resources: dict[str, Any]) -> dict[str, Any]:
    registered = [x for part in parts for x in part["registered"]]
    connected = [x for part in parts for x in part["connected"]]
    rounds: dict[str, dict[str, Any]] = {}
    for part in parts:
        for r, a in part["announce"].items():
            row = rounds.setdefault(r, {"opened_at": a["opened_at"],
                                        "participants": a["participants"], "received": []})
            row["received"] += a["received"]
    announce = {}
    for r, a in sorted(rounds.items(), key=lambda kv: int(kv[0])):
        lat = [t - a["opened_at"] for t in a["received"]] if a["opened_at"] else []
        announce[r] = {"participants": a["participants"], "received_by": len(a["received"]),
                       "fanout_s": _summary(lat),
                       "spread_s": round(max(a["received"]) - min(a["received"]), 4)
                       if a["received"] else None,
                       "all_received_since_start_s": round(max(a["received"]) - t0, 3)
                       if a["received"] else None}
    uploads = [u for part in parts for u in part["uploads"]]
    acked = [u for u in uploads if u["ack"]]
    status: dict[str, int] = {}
    for u in uploads:
        status[u["status"] or "pending"] = status.get(u["status"] or "pending", 0) + 1
    ingest: dict[str, Any] = {"sent": len(uploads), "status": status,
                              "bytes": sum(u["bytes"] for u in uploads),
                              "experts_mean": round(statistics.fmean(u["experts"] for u in uploads), 2)
                              if uploads else None,
                              "resends": sum(u["resends"] for u in uploads)}
    if acked:
        first = min(u["start"] for u in acked)
        last = max(u["ack"] for u in acked)
        span = max(last - first, 1e-9)
        ingest.update(span_s=round(span, 3), updates_per_s=round(len(acked) / span, 2),
                      mb_per_s=round(sum(u["bytes"] for u in acked) / span / 1e6, 3),
                      ack_latency_s=_summary([u["ack"] - u["start"] for u in acked]))
    return {
        "devices": cfg.devices, "processes": len(parts), "run_id": cfg.run_id, "url": cfg.url,
        "wall_s": round(wall, 3),
        "timed_out": any(part["timed_out"] for part in parts),
        "connected": len(connected), "connect_s": _summary(connected),
        "registered": len(registered), "register_s": _summary(registered),
        "all_registered_s": round(max(registered), 3) if len(registered) == cfg.devices else None,
        "registrations_sent": sum(part["registrations"] for part in parts),
        "announce": announce, "ingest": ingest,
        "drops": sum(part["drops"] for part in parts),
        "reconnects": sum(part["reconnects"] for part in parts),
        "by_url": _sum_by_url(parts),
        "errors": [e for part in parts for e in part["errors"]][:20],
        "error_count": sum(part["error_count"] for part in parts),
        "resources": resources,
        **({"uploads": uploads} if cfg.keep_uploads else {}),
    }


def _sum_by_url(parts: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for part in parts:
        for url, row in part["by_url"].items():
            total = out.setdefault(url, dict.fromkeys(row, 0))
            for k, v in row.items():
                total[k] += v
    return out


# --- CLI -----------------------------------------------------------------------------------------


def _range(text: str, kind: type) -> tuple[Any, Any]:
    lo, _, hi = text.partition("-")
    try:
        a = kind(lo)
        return a, kind(hi) if hi else a
    except ValueError as exc:
        raise ConfigError(f"not a range: {text!r} (use LO-HI or one value)") from exc


def register(sub: Any) -> None:
    s = sub.add_parser("swarm", help="load-test a deployment with thousands of simulated devices")
    s.add_argument("--url", default="mqtt://127.0.0.1:1883",
                   help="the broker, or a cluster's nodes separated by commas (the devices "
                        "spread over them)")
    s.add_argument("--run-id", default="", help="the run (default: the server config's run_id)")
    s.add_argument("--config", default="", help="the server's config (model, adapter, wire); "
                                               "needed for uploads")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--devices", type=int, default=100)
    s.add_argument("--processes", type=int, default=1)
    s.add_argument("--rounds", type=int, default=1,
                   help="announcements to take part in (0: register and stop)")
    s.add_argument("--budgets", default="1-8", help="registered budgets, uniform LO-HI")
    s.add_argument("--train-s", default="0.5-2", help="simulated training seconds, LO-HI")
    s.add_argument("--examples", default="20-200")
    s.add_argument("--dropout", type=float, default=0.0,
                   help="probability a participant loses its connection mid-round")
    s.add_argument("--reconnect-s", type=float, default=2.0)
    s.add_argument("--prefix", default="swarm", help="device ids: PREFIX-00000 ...")
    s.add_argument("--persistent", action="store_true",
                   help="persistent sessions like the agent (the broker keeps them)")
    s.add_argument("--timeout", type=float, default=600.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--watch", action="append", default=[], metavar="NAME=PID",
                   help="report RSS and CPU of this process (e.g. server=1234, broker=567)")
    s.add_argument("--out", default="", help="append the report as one JSON line here")
    s.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    run_id = args.run_id
    if not run_id and args.config:
        from hfedmoe.config import load_config
        from server.config import ServerConfig

        run_id = load_config(ServerConfig, args.config, args.overrides).run_id
    watch = {}
    for item in args.watch:
        name, _, pid = item.partition("=")
        if not pid.isdigit():
            raise ConfigError(f"--watch {item!r}: use NAME=PID")
        watch[name] = int(pid)
    cfg = SwarmConfig(url=args.url, run_id=run_id or "hfedmoe", devices=args.devices,
                      prefix=args.prefix, processes=args.processes, rounds=args.rounds,
                      budgets=_range(args.budgets, int), train_s=_range(args.train_s, float),
                      examples=_range(args.examples, int), dropout=args.dropout,
                      reconnect_s=args.reconnect_s, persistent=args.persistent,
                      timeout_s=args.timeout, seed=args.seed, config=args.config or "",
                      overrides=tuple(args.overrides))
    report = run_swarm(cfg, watch)
    line = json.dumps({"bench": "swarm", "time": time.time(), **report})
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(line + "\n")
    print(line)
    return 0 if report["registered"] == cfg.devices and not report["timed_out"] else 1
