"""Sharded ingestion: ``hfedmoe ingest`` workers validate, spool and partially aggregate updates.

With ``ingest.workers = N`` the coordinator (``hfedmoe server``) starts N worker processes and
keeps them running. The workers share the update topics through an MQTT 5 shared subscription
(``$share/{ingest.group}/hfedmoe/v1/{run}/update/+/+/whole``): the broker deals each update
to one worker. An update of at most ``transport.chunk_size`` bytes travels as one message (the
round announcement's ``whole_max_bytes``), so all of it lands on the same worker; a larger one
still goes as manifest + chunks to the coordinator, which ingests it itself.

A worker composes the coordinator's own update intake (:class:`server.intake.Intake`: decode,
the policy, budget, round and base-hash checks, then spool durably, record, ack) against the
run directory's database and spool, adds the update to its own streaming aggregator, and tells
the coordinator on ``ingest/event/{worker}`` (the coordinator's round progress). When the
coordinator closes a round it publishes ``ingest/control``; each worker writes its partial
aggregate (:meth:`hfedmoe.aggregator.Aggregator.to_bytes`, safetensors) under
``partials/r{round}/`` and announces it on ``ingest/partial/{worker}``; the coordinator merges
them (the sums are associative) and reads any acknowledged update that no partial covers (a
worker that was killed) back from the spool. An acknowledged update is durable before its ack
leaves the worker, so killing a worker loses nothing it acknowledged.

With SQLite, workers share the coordinator's run directory (same host). With ``store.url``
(PostgreSQL) and ``store.spool_dir`` on storage every host mounts, a worker runs anywhere in a
directory of its own (``--work-dir``; ``ingest.spawn = false``). See docs/deployment.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hfedmoe.aggregator import Aggregator
from hfedmoe.errors import AlgorithmError, ConfigError, ProtocolError, StoreError
from hfedmoe.protocol import (
    CloseRound,
    DeviceStatus,
    IngestEvent,
    PartialNotice,
    RoundAnnouncement,
)
from hfedmoe.transport.base import Message, Transport
from hfedmoe.transport.chunks import BlobReceiver
from hfedmoe.transport.topics import Topics, check_id
from server.bounds import round_strategy
from server.config import ServerConfig
from server.intake import Intake
from server.registry import DeclaredExamples
from server.rounds import RoundState
from server.store import StateStore, open_store
from server.store.files import fsync_write

log = logging.getLogger("hfedmoe.ingest")
server_log = logging.getLogger("hfedmoe.server")


class IngestWorker:
    """One ingest worker: the coordinator's update intake on a share of the update topics.

    It holds the round the coordinator announced (``round``, ``next_round`` and its own
    ``aggregator``: a :class:`server.rounds.RoundHolder`) and runs an :class:`Intake` with the
    coordinator's rules against the run directory's store; the intake's outcomes go to the
    coordinator as ingest events.
    """

    def __init__(self, cfg: ServerConfig, transport: Transport, model: Any,
                 worker_id: str, work_dir: str | Path | None = None) -> None:
        self.cfg = dataclasses.replace(cfg, prometheus_port=0)  # one endpoint per run
        self.transport = transport
        self.worker_id = check_id(worker_id, "worker id")
        self.topics = Topics(cfg.run_id)
        if work_dir is not None and not (cfg.store.url and cfg.store.spool_dir):
            raise ConfigError("a worker with a directory of its own (--work-dir) needs the "
                              "coordinator's database and spool: set store.url (PostgreSQL) "
                              "and store.spool_dir (shared storage)")
        self.store = open_store(cfg, work_dir)
        self.strategy = round_strategy(cfg)
        self.round: RoundState | None = None
        self.next_round = 0
        self.aggregator = self.strategy.make_aggregator()
        self.intake = Intake(self.cfg, transport, self.store, model.state(), self,
                             strategy=self.strategy, declared=DeclaredExamples(self.store),
                             notify=self._notify, lora_bases=model.lora_bases)
        self.stop_requested = False
        self.partials_written = 0
        self._receiver: BlobReceiver | None = None

    def start(self) -> None:
        t = self.transport
        t.subscribe(self.topics.round(), self._on_announcement)
        t.subscribe(self.topics.ingest_control(), self._on_control)
        self._receiver = BlobReceiver(
            t, self.topics.shared_whole_updates(self.cfg.ingest.group), self._on_update_blob,
            request_topic=self.topics.update_request_for,
            on_error=self.intake.on_transfer_error,
            retry_after=self.cfg.transport.retry_after,
            timeout=self.cfg.transport.transfer_timeout,
            max_bytes=self.cfg.wire.max_payload_bytes)
        t.wait_subscribed()

    def serve(self) -> None:
        """Ingest until SIGTERM (or :attr:`stop_requested`)."""
        self.start()
        log.info("ingest worker %s ready (group %s)", self.worker_id, self.cfg.ingest.group)
        parent = os.getppid()
        while not self.stop_requested:
            self.transport.pump(timeout=0.2)
            if os.getppid() != parent:  # the server is gone: its successor starts new workers
                log.warning("worker %s: the server exited; stopping", self.worker_id)
                break

    def close(self) -> None:
        if self._receiver is not None:
            self._receiver.close()
        self.store.close()

    # --- the coordinator's messages ----------------------------------------------------------
    def _on_announcement(self, message: Message) -> None:
        try:
            ann = RoundAnnouncement.from_bytes(message.payload)
        except ProtocolError:  # "done", or not an announcement
            return
        idx = ann.round_idx
        if self.round is not None and self.round.round_idx == idx:
            return  # announced again (a restarted coordinator): keep what was taken in
        if idx < self.next_round:
            return  # a round this worker already closed
        self.round = RoundState(idx, list(ann.participants), ann.deadline,
                                ann.model.state_hash, ann.model,
                                expected=len(ann.participants))
        self.aggregator = self.strategy.make_aggregator()
        self.next_round = idx
        log.info("worker %s: round %d open", self.worker_id, idx)

    def _on_control(self, message: Message) -> None:
        try:
            close = CloseRound.from_bytes(message.payload)
        except ProtocolError:
            return
        self._close(close.round_idx)

    def _close(self, idx: int) -> None:
        """Write this worker's partial aggregate of round ``idx`` and announce it; updates for
        ``idx`` arriving from now on are late."""
        agg = self.aggregator if self.round is not None and self.round.round_idx == idx \
            else self.strategy.make_aggregator()
        data = agg.to_bytes()
        rel = Path("partials") / f"r{idx}" / f"{self.worker_id}.safetensors"
        fsync_write(self.store.spool_dir / rel, data)
        self.transport.publish(self.topics.ingest_partial(self.worker_id), PartialNotice(
            idx, str(rel), hashlib.sha256(data).hexdigest(), agg.num_clients).to_bytes())
        self.partials_written += 1
        log.info("worker %s: round %d closed with %d update(s)", self.worker_id, idx,
                 agg.num_clients)
        if self.round is not None and self.round.round_idx <= idx:
            self.round = None
        self.next_round = max(self.next_round, idx + 1)
        self.aggregator = self.strategy.make_aggregator()

    # --- updates ---------------------------------------------------------------------------
    def _on_update_blob(self, prefix: str, blob: bytes) -> None:
        try:
            device, _ = self.topics.parse_update_prefix(prefix)
        except Exception:  # noqa: BLE001 - the intake reports malformed prefixes
            device = None
        if device is not None:
            try:
                self.store.refresh_device(device)  # registered (or re-budgeted) since we looked
            except StoreError as exc:  # no ack: the device sends it again
                log.error("worker %s: not taking %s's update: %s", self.worker_id, device, exc)
                self._receiver.forget(prefix)
                return
        if not self.intake.receive(prefix, blob):
            self._receiver.forget(prefix)  # not stored, not acked: take the resend anew

    def _notify(self, event: IngestEvent) -> None:
        self.transport.publish(self.topics.ingest_event(self.worker_id), event.to_bytes())


class IngestLink:
    """The coordinator's end of sharded ingestion: which workers are online, what their
    intakes did (counted by the coordinator's own :meth:`Intake.count`), and their partial
    aggregates, merged into the round's aggregate when the round closes (:meth:`gather`).

    The merge lives here, beside the worker that writes the partials, so that both ends of the
    close-round exchange (``ingest/control``, ``partials/r{round}/``, ``ingest/partial``) read
    in one file; the coordinator only calls :meth:`gather` at close.
    """

    def __init__(self, cfg: ServerConfig, transport: Transport, store: StateStore,
                 intake: Intake) -> None:
        self.cfg = cfg
        self.transport = transport
        self.store = store
        self.intake = intake
        self.topics = Topics(cfg.run_id)
        self.workers_online: set[str] = set()
        self.partials: dict[tuple[int, str], PartialNotice] = {}  # (round, worker) -> notice

    def subscribe(self) -> None:
        t = self.transport
        t.subscribe(self.topics.all_ingest("event"), self.on_event)
        t.subscribe(self.topics.all_ingest("status"), self.on_status)
        t.subscribe(self.topics.all_ingest("partial"), self.on_partial)

    def on_status(self, message: Message) -> None:
        worker = self.topics.parse(message.topic)[-1]
        try:
            state = DeviceStatus.from_bytes(message.payload).state
        except ProtocolError:
            server_log.warning("malformed ingest worker status on %s", message.topic)
            return
        if state == "online":
            self.workers_online.add(worker)
        else:
            self.workers_online.discard(worker)
        server_log.info("ingest worker %s %s (%d online)", worker, state,
                        len(self.workers_online))

    def on_event(self, message: Message) -> None:
        """A worker accepted, rejected or took a late update: the round's counts."""
        try:
            event = IngestEvent.from_bytes(message.payload)
        except ProtocolError as exc:
            server_log.warning("malformed ingest event on %s: %s", message.topic, exc)
            return
        self.intake.count(event)

    def on_partial(self, message: Message) -> None:
        worker = self.topics.parse(message.topic)[-1]
        try:
            notice = PartialNotice.from_bytes(message.payload)
        except ProtocolError as exc:
            server_log.warning("malformed partial-aggregate notice from %s: %s", worker, exc)
            return
        self.partials[(notice.round_idx, worker)] = notice

    def gather(self, r: RoundState, aggregator: Aggregator) -> None:
        """Close round ``r`` on the workers, merge their partial aggregates into
        ``aggregator`` (the coordinator's own: multi-chunk updates), then add every
        acknowledged update of the round that no partial covers (a worker that died or did
        not answer) from the spool."""
        self.transport.publish(self.topics.ingest_control(), CloseRound(r.round_idx).to_bytes())
        waiting = set(self.workers_online)
        self.transport.run_until(
            lambda: all((r.round_idx, w) in self.partials or w not in self.workers_online
                        for w in waiting),
            timeout=self.cfg.ingest.partial_timeout_s)
        # read before anything is merged: a StoreError here leaves the aggregate untouched,
        # so the coordinator can call this again once the store is back
        spooled = self.store.updates(r.round_idx)
        for (round_idx, worker), notice in sorted(self.partials.items()):
            if round_idx != r.round_idx:
                continue
            try:
                aggregator.merge(self._partial(notice, aggregator))
            except (OSError, AlgorithmError) as exc:
                server_log.warning("round %d: partial aggregate of %s unusable (%s); its "
                                   "updates are read from the spool", r.round_idx, worker, exc)
        covered = set(aggregator.summaries)
        for stored in spooled:
            if not stored.late:
                r.accepted[stored.client_id] = stored.num_bytes
            if stored.client_id in covered:
                continue
            aggregator.add(self.intake.read_back(stored))
            server_log.info("round %d: %s read back from the spool", r.round_idx,
                            stored.client_id)
        self.partials = {k: v for k, v in self.partials.items() if k[0] > r.round_idx}

    def _partial(self, notice: PartialNotice, aggregator: Aggregator) -> Aggregator:
        """The partial aggregate a notice announces, checked (path, sha256, no overlap)."""
        rel = Path(notice.path)
        if rel.is_absolute() or ".." in rel.parts or rel.parts[:1] != ("partials",):
            raise AlgorithmError(f"partial aggregate path {rel} is not under partials/")
        data = (self.store.spool_dir / rel).read_bytes()
        if hashlib.sha256(data).hexdigest() != notice.sha256:
            raise AlgorithmError("content does not match the announced sha256")
        partial = Aggregator.from_bytes(data, aggregator.rule, aggregator.kinds)
        if set(partial.summaries) & set(aggregator.summaries):
            # e.g. the coordinator restarted and re-read the spool: the spool wins
            raise AlgorithmError("it overlaps updates already aggregated")
        return partial


class WorkerPool:
    """The ingest workers of ``hfedmoe server``: started, restarted when one exits, stopped."""

    def __init__(self, cfg: ServerConfig, restart_after: float = 2.0) -> None:
        if not cfg.transport.url:
            raise ConfigError("ingest.workers needs an external broker with shared "
                              "subscriptions (Mosquitto >= 2 or EMQX): set transport.url")
        self.cfg = cfg
        self.dir = Path(cfg.run_dir) / "ingest"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.dir / "server.toml"
        self.procs: dict[str, subprocess.Popen] = {}
        self.restarts = 0
        self.restart_after = restart_after
        self._exited: dict[str, float] = {}

    def start(self) -> WorkerPool:
        import tomli_w

        from hfedmoe.config import to_dict

        self.config_path.write_text(tomli_w.dumps(_toml_safe(to_dict(self.cfg))))
        for i in range(self.cfg.ingest.workers):
            self._spawn(f"w{i}")
        return self

    def _spawn(self, worker: str) -> None:
        log_file = open(self.dir / f"{worker}.log", "a")  # noqa: SIM115 - the child owns it
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.procs[worker] = subprocess.Popen(
            [sys.executable, "-m", "hfedmoe.cli", "ingest", "--config", str(self.config_path),
             "--worker", worker], stdout=log_file, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)
        log_file.close()
        log.info("ingest worker %s started (pid %d)", worker, self.procs[worker].pid)

    def check(self) -> None:
        """Restart workers that exited (after ``restart_after`` seconds)."""
        now = time.monotonic()
        for worker, proc in list(self.procs.items()):
            if proc.poll() is None:
                continue
            first = self._exited.setdefault(worker, now)
            if now - first >= self.restart_after:
                log.warning("ingest worker %s exited with %s; restarting", worker,
                            proc.returncode)
                del self._exited[worker]
                self.restarts += 1
                self._spawn(worker)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _toml_safe(value: Any) -> Any:
    """TOML has no null: drop None values (the config's defaults stand in for them)."""
    if isinstance(value, dict):
        return {k: _toml_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_toml_safe(v) for v in value]
    return value


# --- CLI -----------------------------------------------------------------------------------------


def register(sub: Any) -> None:
    from hfedmoe.cli import add_config_args

    s = sub.add_parser("ingest", help="an ingest worker (sharded ingestion; the server starts "
                                      "them when ingest.workers > 0)")
    add_config_args(s)
    s.add_argument("--worker", required=True, help="this worker's id (w0, w1, ...)")
    s.add_argument("--work-dir", help="this worker's own directory (default: the config's "
                                      "run_dir); needs store.url and store.spool_dir")
    s.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    import torch

    from hfedmoe.config import load_config
    from hfedmoe.data import load_task
    from hfedmoe.models.registry import build_model
    from hfedmoe.transport.mqtt import MqttTransport

    cfg = load_config(ServerConfig, args.config, args.overrides)
    torch.set_num_threads(1)
    task = load_task(cfg.data)
    model = build_model(cfg.model, cfg.data.task, task.num_labels)
    worker = check_id(args.worker, "worker id")
    # a client id of its own per process: a restarted pool's worker never kicks an old one
    transport = MqttTransport(cfg.transport, f"server-{cfg.run_id}-ingest-{worker}-{os.getpid()}",
                              Topics(cfg.run_id).ingest_status(worker), persistent=False)
    ingest = IngestWorker(cfg, transport, model, worker, args.work_dir)

    def stop(*_: Any) -> None:
        ingest.stop_requested = True

    signal.signal(signal.SIGTERM, stop)
    try:
        ingest.serve()
    finally:
        ingest.close()
        transport.close()
    return 0
