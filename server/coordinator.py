"""The round state machine: register devices, announce rounds, collect, aggregate, evaluate.

All work happens on one thread that pumps the transport; transport callbacks only enqueue.
Every update is validated against the model (:func:`hfedmoe.wire.decode_full`) and by the
aggregator before it is spooled, and spooled before it is acknowledged (:mod:`server.store`).
A rejected update gets an error on the device's ack topic and a row in ``rejections``; the
global model is untouched. A SIGKILL at any point is recovered by :meth:`Coordinator.resume`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hfedmoe.aggregator import Aggregator
from hfedmoe.data import PairDataset, TextDataset
from hfedmoe.errors import (
    AlgorithmError,
    BudgetExceededError,
    DiskFullError,
    HFedMoEError,
    MismatchError,
    PolicyError,
    ProtocolError,
    WireError,
)
from hfedmoe.lora import LoRASpec, expand, with_factors
from hfedmoe.models.base import MoEModel
from hfedmoe.modelsync import ModelManifest, build_shards
from hfedmoe.names import ExpertId
from hfedmoe.protocol import (
    CloseRound,
    DeviceStatus,
    Done,
    FetchRequest,
    IngestEvent,
    PartialNotice,
    Registered,
    Registration,
    RoundAnnouncement,
    UpdateAck,
)
from hfedmoe.strategies import get_strategy
from hfedmoe.transport.base import Message, Transport
from hfedmoe.transport.chunks import BlobReceiver, ChunkSender
from hfedmoe.transport.topics import Topics, check_device_id
from hfedmoe.update import SparseUpdate
from hfedmoe.wire import decode, decode_full, spec_from_state
from server.config import ServerConfig
from server.evaluate import evaluate
from server.rounds import (
    choose_participants,
    dense_update_bytes,
    disagreement_of,
    experts_in,
    initial_row,
    participation_record,
    round_row,
    updates_expected,
)
from server.store import Store

REGISTRATION_BATCH = 512  # registrations committed (one fsync) and acked together, at most

log = logging.getLogger("hfedmoe.server")
LATE_SEP = "~"  # "device~r3": a late update of round 3 folded into a later round


class UnknownClientError(WireError):
    """An update or request from a device that is not registered (or not allowed)."""


@dataclass
class RoundState:
    """The open round."""

    round_idx: int
    participants: list[str]
    deadline: float  # time.time() seconds
    base_hash: str
    manifest: ModelManifest
    expected: int
    accepted: dict[str, int] = field(default_factory=dict)  # client -> bytes
    refused: set[str] = field(default_factory=set)  # participants whose update was rejected
    rejected: int = 0
    late: int = 0
    bytes_out: int = 0
    started: float = field(default_factory=time.time)
    usage: dict[str, Any] = field(default_factory=dict)  # client -> u_c(e), for the signals
    skipped: dict[str, list[str]] = field(default_factory=dict)  # participant -> why it sat out
    disagreement: dict[str, float] = field(default_factory=dict)


class Coordinator:
    """Runs federated rounds for one run directory.

    Args:
        cfg: the server config.
        transport: a connected transport (MQTT or in-memory).
        model: the server's model (global state lives in it between rounds).
        test_data: the held-out split for evaluation.
        clock: wall clock (``time.time``); injectable for tests.
    """

    def __init__(self, cfg: ServerConfig, transport: Transport, model: MoEModel,
                 test_data: TextDataset | PairDataset | None,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.transport = transport
        self.model = model
        self.test_data = test_data
        self.clock = clock
        self.topics = Topics(cfg.run_id)
        self.store = Store(cfg.run_dir)
        self.strategy = get_strategy(cfg.method.strategy, cfg.method)
        # train.adapter = "lora": updates carry factors, expanded to exact products on arrival
        self.lora = (LoRASpec(cfg.train.lora_rank, cfg.train.lora_alpha)
                     if cfg.train.adapter == "lora" else None)
        self.spec = spec_from_state(model.state())
        if self.lora is not None:
            self.spec = with_factors(self.spec, self.lora)
        self.global_state = model.state()
        # what one dense (fedavg-full) update of this model weighs on the wire, uncompressed
        self.dense_bytes = dense_update_bytes(self.global_state, cfg.wire.dtype)
        self.blobs: dict[str, bytes] = {}  # shard sha -> blob, current and previous round
        self.senders: dict[str, ChunkSender] = {}
        self.sent_full: dict[str, float] = {}  # shard sha -> when it was last sent whole
        self.round: RoundState | None = None
        self.next_round = 0
        self.aggregator = self.strategy.make_aggregator()
        self.metrics_path = Path(cfg.run_dir) / "metrics.jsonl"
        self._receiver: BlobReceiver | None = None
        self._prom = _Prometheus(cfg.prometheus_port)
        self.on_tick: Callable[[], None] | None = None  # e.g. restarting ingest workers
        self.workers_online: set[str] = set()  # ingest workers (sharded ingestion)
        # device -> its latest eligibility report (eligible, reasons, conditions, round, at)
        self.eligibility: dict[str, dict[str, Any]] = {}
        self.partials: dict[tuple[int, str], PartialNotice] = {}  # (round, worker) -> notice
        self._registrations: dict[str, tuple[str, dict[str, Any], int]] = {}
        self._declared: dict[str, int | None] | None = None  # local_examples per device
        self._declared_dirty = True
        # called on this thread with "tick" (between pumps while waiting), "open" and "close"
        # (a round): the dashboard's snapshots
        self.hooks: list[Callable[[str], None]] = []
        self.dashboard: Any = None  # server.dashboard.Dashboard when dashboard_port is set

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Subscribe and recover state from the run directory."""
        t = self.transport
        t.subscribe(self.topics.all_register(), self._on_register)
        t.subscribe(self.topics.all_status(), self._on_status)
        t.subscribe(self.topics.all_fetches(), self._on_fetch)
        sharded = self.cfg.ingest.workers > 0
        if sharded:
            t.subscribe(self.topics.all_ingest("event"), self._on_ingest_event)
            t.subscribe(self.topics.all_ingest("status"), self._on_ingest_status)
            t.subscribe(self.topics.all_ingest("partial"), self._on_partial)
        self._receiver = BlobReceiver(
            t, self.topics.all_update_pieces() if sharded else self.topics.all_updates(),
            self._on_update_blob,
            request_topic=self.topics.update_request_for,
            on_error=self._on_transfer_error,
            retry_after=self.cfg.transport.retry_after, timeout=self.cfg.transport.transfer_timeout,
            max_bytes=self.cfg.wire.max_payload_bytes)
        t.wait_subscribed()
        self.store.set_meta("config", json.dumps(_jsonable(self.cfg)))
        self.resume()
        log.info("ready: run %s, %d device(s) known", self.cfg.run_id, len(self.store.devices()))
        if self.cfg.dashboard_port:
            from server.dashboard import Dashboard

            self.dashboard = Dashboard(self).start()

    def resume(self) -> None:
        """Load the latest checkpoint; reopen an interrupted round with its spooled updates."""
        latest = self.store.latest_checkpoint()
        if latest is not None:
            done_round, state = latest
            self.global_state = {k: state[k] for k in self.global_state}
            self.model.load_state(self.global_state)
            self.next_round = done_round + 1
            log.info("resumed from checkpoint of round %d", done_round)
        last = self.store.last_round()
        if last is not None and last >= self.next_round:
            info = self.store.round_info(last)
            if info is not None and info["state"] != "done":
                self._open_round(last, info["participants"], info["deadline"], announce=True)
                for stored in self.store.updates(last):
                    device = stored.client_id.split(LATE_SEP)[0]
                    update = self._decode(self.store.read_update(stored), device, None)
                    if stored.late:  # a folded late update keeps its own aggregation key
                        update = dataclasses.replace(update, client_id=stored.client_id)
                        self.round.late += 1
                    else:
                        self.round.accepted[stored.client_id] = stored.num_bytes
                    self.aggregator.add(update)
                log.info("round %d reopened with %d acknowledged update(s)", last,
                         len(self.round.accepted))

    def run(self) -> list[dict[str, Any]]:
        """Run the configured rounds; returns the metrics rows written."""
        self.start()
        rows = []
        if self.next_round == 0 and self.round is None and not self.metrics_path.exists():
            rows.append(self._write_metrics(initial_row(self._evaluate())))
        while self.next_round < self.cfg.rounds.rounds or self.round is not None:
            if self.round is None:
                participants = self._choose_participants()
                deadline = self.clock() + self.cfg.rounds.deadline_s
                self._open_round(self.next_round, participants, deadline, announce=True)
            self._collect()
            rows.append(self._close_round())
        self._announce(Done(self.cfg.rounds.rounds))
        return rows

    def close(self) -> None:
        if self.dashboard is not None:
            self.dashboard.close()
        for sender in self.senders.values():
            sender.close()
        if self._receiver is not None:
            self._receiver.close()
        self._prom.close()
        self.store.close()

    # --- rounds ------------------------------------------------------------------------------
    def online_devices(self) -> dict[str, dict[str, Any]]:
        return {d: info for d, info in self.store.devices().items() if info["status"] == "online"}

    def _choose_participants(self) -> list[str]:
        rc = self.cfg.rounds
        ok = self.transport.run_until(lambda: len(self.online_devices()) >= rc.min_devices,
                                      timeout=rc.registration_timeout_s,
                                      tick=self._tick)
        while not self.online_devices():  # a round without devices is pointless: keep waiting
            log.info("waiting for a device to register")
            self.transport.run_until(lambda: bool(self.online_devices()), timeout=30.0,
                                     tick=self._tick)
        online = self.online_devices()
        if not ok:
            log.warning("only %d of %d devices online after %.0fs; starting anyway",
                        len(online), rc.min_devices, rc.registration_timeout_s)
        return choose_participants(online, self.next_round, fraction=rc.fraction, seed=rc.seed,
                                   over_select=rc.over_select)

    def _open_round(self, round_idx: int, participants: list[str], deadline: float,
                    announce: bool) -> None:
        manifest, blobs = build_shards(self.global_state)
        self.blobs = {**{s: b for s, b in self.blobs.items() if s in set(blobs)}, **blobs}
        rc = self.cfg.rounds
        self.round = RoundState(round_idx, participants, deadline, manifest.state_hash, manifest,
                                updates_expected(len(participants), rc.min_updates,
                                                 rc.over_select))
        self.aggregator = self.strategy.make_aggregator()
        self.store.open_round(round_idx, deadline, participants, manifest.state_hash)
        if announce:
            devices = self.store.devices()
            self._announce(RoundAnnouncement(
                round_idx=round_idx, deadline=deadline, opened_at=self.clock(),
                deadline_s=max(0.0, deadline - self.clock()),
                train_time_s=self.cfg.rounds.train_time_s or None,
                strategy=self.strategy.name, method=_jsonable(self.cfg.method),
                train=_jsonable(self.cfg.train), max_length=self.cfg.model.max_length,
                participants=tuple(participants),
                whole_max_bytes=self.cfg.transport.chunk_size,
                eligibility=self.cfg.eligibility.to_dict(),
                budgets={d: devices.get(d, {}).get("budget", 0) for d in participants},
                model=manifest))
        self._prom.set_round(round_idx)
        log.info("round %d open: %d participant(s), wait for %d, deadline in %.0fs", round_idx,
                 len(participants), self.round.expected, deadline - self.clock())
        self._hook("open")

    def _collect(self) -> None:
        r = self.round
        assert r is not None

        def finished() -> bool:
            if len(r.accepted) >= r.expected:
                return True
            online = self.online_devices()
            waiting = [p for p in r.participants
                       if p not in r.accepted and p not in r.refused and p in online]
            return not waiting or self.clock() >= r.deadline

        while not finished():
            self.transport.pump(timeout=0.1)
            self._flush_registrations()
            if self.on_tick is not None:
                self.on_tick()
            self._hook("tick")
            if self._receiver is not None:
                self._receiver.poll()

    def _close_round(self) -> dict[str, Any]:
        r = self.round
        assert r is not None
        self.store.set_round_state(r.round_idx, "aggregating")
        report, agg_s = self._aggregate(r)
        metrics = self._evaluate()
        new_hash, _ = build_shards(self.global_state)
        row = self._round_row(r, report, metrics, agg_s)
        if "privacy" in row:
            log.info("round %d: privacy: epsilon <= %.3f at delta %g (max over devices)",
                     r.round_idx, row["privacy"]["epsilon_max"], row["privacy"]["delta"])
        self.store.save_checkpoint(r.round_idx, self.global_state, {
            k: v for k, v in row.items() if k not in ("devices",)}, new_hash.state_hash)
        shutil.rmtree(Path(self.cfg.run_dir) / "partials" / f"r{r.round_idx}",
                      ignore_errors=True)  # the checkpoint holds the round now
        ret = self.cfg.retention
        freed = self.store.prune(r.round_idx, ret.keep_updates, ret.keep_checkpoints,
                                 ret.keep_best)
        row["run_dir_bytes"] = self.store.size_bytes()
        if freed:
            log.info("round %d: retention freed %.1f MB; run directory %.1f MB", r.round_idx,
                     freed / 1e6, row["run_dir_bytes"] / 1e6)
        self._write_metrics(row)
        log.info("round %d: participants=%d accepted=%d rejected=%d late=%d experts=%d "
                 "in=%.1fMB out=%.1fMB agg=%.2fs %s", r.round_idx, len(r.participants),
                 len(r.accepted), r.rejected, r.late, row["experts_updated"],
                 row["bytes_in"] / 1e6, r.bytes_out / 1e6, agg_s,
                 " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
        self._prom.observe(row)
        self.next_round = r.round_idx + 1
        self.round = None
        self._hook("close")
        return row

    def _aggregate(self, r: RoundState) -> tuple[dict[str, Any], float]:
        """Fold the round's updates into the global model; its report and the seconds taken."""
        t0 = time.perf_counter()
        if self.cfg.ingest.workers > 0:
            self._gather_partials(r)
        report = self.aggregator.report()
        if self.aggregator.num_clients:
            new_state = self.aggregator.finalize(self.global_state)
        else:
            new_state = self.global_state
        agg_s = time.perf_counter() - t0
        self.model.load_state(new_state)
        self.global_state = self.model.state()
        return report, agg_s

    def _round_row(self, r: RoundState, report: dict[str, Any], metrics: dict[str, float],
                   agg_s: float) -> dict[str, Any]:
        """The round's metrics row (:func:`server.rounds.round_row`) from the open round and
        the participation records stored for it (by this process or an ingest worker)."""
        noised = (Counter(p["client"] for p in self.store.participation())
                  if self.cfg.method.dp_noise_multiplier > 0 else {})
        round_s = self.clock() - r.started
        return round_row(
            r.round_idx, participants=r.participants, accepted=r.accepted, report=report,
            metrics=metrics,
            budgets={d: info["budget"] for d, info in self.store.devices().items()},
            records={p["client"]: p for p in self.store.participation(r.round_idx)},
            usage=r.usage, disagreement=r.disagreement, dense_bytes=self.dense_bytes,
            method=self.cfg.method, noised_updates=noised, aggregation_s=agg_s,
            round_s=round_s, wall_s=round_s, rejected=r.rejected, late=r.late,
            bytes_out=r.bytes_out, skipped=r.skipped)

    def _tick(self) -> None:
        """Between pumps while waiting for devices: commit registrations, then the hooks."""
        self._flush_registrations()
        self._hook("tick")

    def _hook(self, event: str) -> None:
        for hook in self.hooks:
            hook(event)

    def _evaluate(self) -> dict[str, float]:
        if self.test_data is None or len(self.test_data) == 0:
            return {}
        return evaluate(self.model, self.test_data, self.cfg.eval_batch_size,
                        self.cfg.model.max_length, self.cfg.max_eval_examples)

    def _write_metrics(self, row: dict[str, Any]) -> dict[str, Any]:
        row = {"time": self.clock(), **row}
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        return row

    # --- messages ----------------------------------------------------------------------------
    def _announce(self, message: RoundAnnouncement | Done) -> None:
        self.transport.publish(self.topics.round(), message.to_bytes(), retain=True)

    def _ack(self, device: str, message: Registered | UpdateAck) -> None:
        self.transport.publish(self.topics.ack(device), message.to_bytes())

    def _on_register(self, message: Message) -> None:
        device = self.topics.parse(message.topic)[-1]
        try:
            check_device_id(device)  # ReservedIdError: "server" is the coordinator's account
            reg = Registration.from_bytes(message.payload, self.cfg.max_register_bytes)
            declared = reg.local_examples
            if declared is not None and declared > self.cfg.policy.max_registered_examples:
                raise PolicyError(f"registration declares local_examples={declared!r} (an int "
                                  f"in [0, {self.cfg.policy.max_registered_examples}])")
            allowed = self.cfg.rounds.allowed_devices
            if allowed and device not in allowed:
                raise UnknownClientError(f"device {device!r} is not allowed in this run")
        except (ValueError, HFedMoEError) as exc:
            self._reject(device, None, exc)
            return
        self._registrations[device] = (device, dict(reg.report), reg.budget)
        if self.transport.pending() == 0 or len(self._registrations) >= REGISTRATION_BATCH:
            self._flush_registrations()

    def _flush_registrations(self) -> None:
        """Commit the registrations taken since the last flush in one transaction, then ack
        them: a burst of thousands costs one fsync, and an ack still means durable."""
        if not self._registrations:
            return
        rows = list(self._registrations.values())
        self._registrations.clear()
        self.store.upsert_devices(rows)
        self._declared_dirty = True
        for device, _, budget in rows:
            log.debug("device %s registered (budget %d)", device, budget)
            self._ack(device, Registered(self.cfg.run_id))
        log.info("%d device(s) registered (%d known)", len(rows), len(self.store.devices()))

    def _on_status(self, message: Message) -> None:
        device = self.topics.parse(message.topic)[-1]
        try:
            status = DeviceStatus.from_bytes(message.payload)
        except ProtocolError:
            return
        if device not in self.store.devices():
            return
        self.store.set_device_status(device, status.state)
        if status.eligible is not None:
            self._on_eligibility(device, status)

    def _on_eligibility(self, device: str, status: DeviceStatus) -> None:
        """A device's eligibility report: kept for the dashboard; a participant that is not
        eligible sits the round out (the round stops waiting for it) and the skip is
        recorded with its reasons."""
        reasons, conditions = list(status.reasons), dict(status.conditions)
        self.eligibility[device] = {"eligible": status.eligible, "reasons": reasons,
                                    "conditions": conditions, "round": status.round_idx,
                                    "at": self.clock()}
        r = self.round
        if status.eligible or status.sending or r is None or status.round_idx != r.round_idx \
                or device not in r.participants or device in r.accepted:
            return  # a device whose conditions broke mid-round but sends its partial work
        r.skipped[device] = reasons
        r.refused.add(device)
        self.store.record_skip(r.round_idx, device, reasons, conditions, status.during_round)
        log.info("%s sits round %d out: %s", device, r.round_idx, "; ".join(reasons))

    def _on_fetch(self, message: Message) -> None:
        parts = self.topics.parse(message.topic)  # update/{device}/fetch/{sha}
        device, sha = parts[1], parts[3]
        blob = self.blobs.get(sha)
        if blob is None or device not in self.store.devices():
            return
        try:
            want = FetchRequest.from_bytes(message.payload)
        except ProtocolError:
            return
        sender = self.senders.get(sha)
        if sender is None:
            sender = self.senders[sha] = ChunkSender(self.transport, self.topics.model(sha), blob,
                                                     self.cfg.transport.chunk_size)
        recently = time.monotonic() - self.sent_full.get(sha, -1e9) < self.cfg.transport.retry_after
        if want.manifest and recently:
            # every device asks at the start of a round; one broadcast serves all of them,
            # and a device that subscribed late asks for the chunks it lacks
            sender.publish_manifest()
            sent = 0
        elif want.manifest:
            sender.publish_manifest()
            sender.resend(range(len(sender.manifest.chunks)))
            self.sent_full[sha] = time.monotonic()
            sent = len(blob)
        else:
            sender.answer(want, message.topic)
            n = len(sender.manifest.chunks)
            sent = sum(sender.manifest.chunk_len(i) for i in want.chunks) if want.fits(n) else 0
        if self.round is not None:
            self.round.bytes_out += sent

    def _decode(self, blob: bytes, device: str, base_hash: str | None) -> SparseUpdate:
        update = decode(blob, self.spec, self.cfg.wire, run_id=self.cfg.run_id,
                        client_id=device, base_model_hash=base_hash)
        return expand(update, self.lora) if self.lora is not None else update

    def _on_update_blob(self, prefix: str, blob: bytes) -> None:
        device, sha = self.topics.parse_update_prefix(prefix)
        r = self.round
        round_idx = None
        try:
            if device not in self.store.devices():
                raise UnknownClientError(f"device {device!r} is not registered")
            header, update = decode_full(blob, self.spec, self.cfg.wire, run_id=self.cfg.run_id,
                                         client_id=device)
            if self.lora is not None:
                update = expand(update, self.lora)
            round_idx = header.round_idx
            update = self._check_weights(device, update)
            stored = self.store.update(round_idx, device)
            if stored is not None:  # a resend of an acknowledged update
                self._ack(device, UpdateAck(round_idx, sha, "accepted"))
                return
            if r is not None and round_idx == r.round_idx:
                if device not in r.participants:
                    raise UnknownClientError(f"{device} is not a participant of round "
                                             f"{round_idx}")
                if update.base_model_hash != r.base_hash:
                    raise MismatchError(f"base_model_hash: got {update.base_model_hash[:12]}, "
                                        f"expected {r.base_hash[:12]}")
                budget = self._check_budget(device, update)
                self._check_room(len(blob))  # DiskFullError before anything is taken in
                self.aggregator.add(update)  # validates consistency before anything is kept
                self.store.spool_update(round_idx, device, blob, update.num_examples)
                self._record(round_idx, device, budget, update, len(blob))
                r.accepted[device] = len(blob)
                r.usage[device] = update.usage
                dis = disagreement_of(update)
                if dis is not None:
                    r.disagreement[device] = dis
                self._prom.count("accepted")
                self._ack(device, UpdateAck(round_idx, sha, "accepted"))
                self._notify(IngestEvent(
                    "accepted", device, round_idx, nbytes=len(blob),
                    usage={str(e): v for e, v in update.usage.items()},
                    disagreement=r.disagreement.get(device)))
            elif round_idx < (r.round_idx if r is not None else self.next_round):
                self._late(device, round_idx, sha, blob, update)
            else:
                raise MismatchError(f"round: got {round_idx}, no such round is open")
        except (HFedMoEError, AlgorithmError) as exc:
            self._reject(device, round_idx, exc, sha)

    def _late(self, device: str, round_idx: int, sha: str, blob: bytes, update: Any) -> None:
        r = self.round
        if r is not None:
            r.late += 1
        self._prom.count("late")
        fold = (self.cfg.rounds.late_policy == "fold" and r is not None
                and round_idx == r.round_idx - 1)
        if fold:
            # counted in the open round under its own key, so the device's own update for
            # this round is not a duplicate
            key = f"{device}{LATE_SEP}r{round_idx}"
            try:
                self._check_budget(device, update)
                self._check_room(len(blob))
                self.aggregator.add(dataclasses.replace(update, client_id=key))
            except (AlgorithmError, BudgetExceededError, DiskFullError) as exc:
                self._reject(device, round_idx, exc, sha)
                return
            self.store.spool_update(r.round_idx, key, blob, update.num_examples, late=True)
        self._ack(device, UpdateAck(round_idx, sha, "late-folded" if fold else "late-dropped"))
        self._notify(IngestEvent("late", device, round_idx))
        log.info("late update from %s for round %d %s", device, round_idx,
                 "folded into the open round" if fold else "dropped")

    def _check_budget(self, device: str, update: SparseUpdate) -> int:
        """The device's registered budget; raises when the update carries more experts.

        fedavg-full ignores budgets by design (every device trains every expert)."""
        budget = int(self.store.devices().get(device, {}).get("budget", 0))
        sent = experts_in(update)
        if self.strategy.uses_budget and len(sent) > budget:
            raise BudgetExceededError(f"update carries {len(sent)} experts, the device's "
                                      f"registered budget is {budget}")
        return budget

    def _check_room(self, nbytes: int) -> None:
        ret = self.cfg.retention
        try:
            self.store.check_room(nbytes, int(ret.min_free_mb * 2**20),
                                  int(ret.max_run_dir_mb * 2**20))
        except DiskFullError as exc:
            log.error("refusing updates: %s", exc)
            raise

    def _check_weights(self, device: str, update: SparseUpdate) -> SparseUpdate:
        """Apply the weighting policy to ``num_examples`` (PolicyError, or clipped)."""
        declared = self._declared_examples()
        cap = self.cfg.policy.examples_cap(declared.get(device),
                                           [n for n in declared.values() if n])
        if cap is None or update.num_examples <= cap:
            return update
        if self.cfg.policy.on_violation == "reject":
            raise PolicyError(f"num_examples {update.num_examples} is over the policy's cap "
                              f"{cap} for {device}")
        log.warning("%s: num_examples %d clipped to the policy's cap %d", device,
                    update.num_examples, cap)
        return dataclasses.replace(update, num_examples=cap)

    def _declared_examples(self) -> dict[str, int | None]:
        """local_examples each device declared, recomputed only after registrations."""
        n = len(self.store.devices())
        if self._declared is None or len(self._declared) != n or self._declared_dirty:
            self._declared = {d: _declared_examples(info["report"])
                              for d, info in self.store.devices().items()}
            self._declared_dirty = False
        return self._declared

    def _record(self, round_idx: int, device: str, budget: int, update: SparseUpdate,
                nbytes: int) -> None:
        rec = participation_record(budget, update, nbytes)
        self.store.record_participation(round_idx, device, rec.budget, rec.experts_sent,
                                        rec.optimizer_experts, rec.info())

    # --- sharded ingestion: the coordinator's side ------------------------------------------
    def _notify(self, event: IngestEvent) -> None:
        """An ingest worker tells the coordinator what it did; the coordinator itself: no-op."""

    def _on_ingest_status(self, message: Message) -> None:
        worker = self.topics.parse(message.topic)[-1]
        try:
            state = DeviceStatus.from_bytes(message.payload).state
        except ProtocolError:
            log.warning("malformed ingest worker status on %s", message.topic)
            return
        if state == "online":
            self.workers_online.add(worker)
        else:
            self.workers_online.discard(worker)
        log.info("ingest worker %s %s (%d online)", worker, state, len(self.workers_online))

    def _on_ingest_event(self, message: Message) -> None:
        """A worker accepted, rejected or took a late update: the round's counts (its spool
        and database rows are the durable record; these only drive the round's progress)."""
        r = self.round
        try:
            event = IngestEvent.from_bytes(message.payload)
        except ProtocolError as exc:
            log.warning("malformed ingest event on %s: %s", message.topic, exc)
            return
        device = event.device
        if event.kind == "rejected":
            self._prom.count("rejected")
            if r is not None:
                r.rejected += 1
                if event.sha and event.round_idx == r.round_idx:
                    r.refused.add(device)
        elif event.kind == "late":
            self._prom.count("late")
            if r is not None:
                r.late += 1
        elif r is not None and event.round_idx == r.round_idx:  # accepted
            self._prom.count("accepted")
            r.accepted[device] = event.nbytes
            try:
                r.usage[device] = {ExpertId.parse(e): float(v) for e, v in event.usage.items()}
            except HFedMoEError:
                pass
            if event.disagreement is not None:
                r.disagreement[device] = float(event.disagreement)

    def _on_partial(self, message: Message) -> None:
        worker = self.topics.parse(message.topic)[-1]
        try:
            notice = PartialNotice.from_bytes(message.payload)
        except ProtocolError as exc:
            log.warning("malformed partial-aggregate notice from %s: %s", worker, exc)
            return
        self.partials[(notice.round_idx, worker)] = notice

    def _gather_partials(self, r: RoundState) -> None:
        """Close round ``r`` on the workers, merge their partial aggregates into the
        coordinator's own (multi-chunk updates), then add every acknowledged update of the
        round that no partial covers (a worker that died or did not answer) from the spool."""
        self.transport.publish(self.topics.ingest_control(), CloseRound(r.round_idx).to_bytes())
        waiting = set(self.workers_online)
        self.transport.run_until(
            lambda: all((r.round_idx, w) in self.partials or w not in self.workers_online
                        for w in waiting),
            timeout=self.cfg.ingest.partial_timeout_s)
        for (round_idx, worker), notice in sorted(self.partials.items()):
            if round_idx != r.round_idx:
                continue
            try:
                rel = Path(notice.path)
                if rel.is_absolute() or ".." in rel.parts or rel.parts[:1] != ("partials",):
                    raise AlgorithmError(f"partial aggregate path {rel} is not under partials/")
                data = (Path(self.cfg.run_dir) / rel).read_bytes()
                if hashlib.sha256(data).hexdigest() != notice.sha256:
                    raise AlgorithmError("content does not match the announced sha256")
                partial = Aggregator.from_bytes(data, self.aggregator.rule, self.aggregator.kinds)
                if set(partial.summaries) & set(self.aggregator.summaries):
                    # e.g. the coordinator restarted and re-read the spool: the spool wins
                    raise AlgorithmError("it overlaps updates already aggregated")
                self.aggregator.merge(partial)
            except (OSError, AlgorithmError) as exc:
                log.warning("round %d: partial aggregate of %s unusable (%s); its updates are "
                            "read from the spool", r.round_idx, worker, exc)
        covered = set(self.aggregator.summaries)
        for stored in self.store.updates(r.round_idx):
            if not stored.late:
                r.accepted[stored.client_id] = stored.num_bytes
            if stored.client_id in covered:
                continue
            device = stored.client_id.split(LATE_SEP)[0]
            update = self._decode(self.store.read_update(stored), device, None)
            if stored.late:
                update = dataclasses.replace(update, client_id=stored.client_id)
            self.aggregator.add(update)
            log.info("round %d: %s read back from the spool", r.round_idx, stored.client_id)
        self.partials = {k: v for k, v in self.partials.items() if k[0] > r.round_idx}

    def _on_transfer_error(self, prefix: str, exc: Exception) -> None:
        """A transfer that cannot complete (too large, corrupt, timed out): tell the device."""
        try:
            device, sha = self.topics.parse_update_prefix(prefix)
        except HFedMoEError:
            return
        if device in self.store.devices():
            self._reject(device, None if self.round is None else self.round.round_idx, exc, sha)

    def _reject(self, device: str, round_idx: int | None, exc: Exception,
                sha: str = "") -> None:
        if self.round is not None:
            self.round.rejected += 1
            if sha and round_idx == self.round.round_idx:
                self.round.refused.add(device)
        self._prom.count("rejected")
        self._notify(IngestEvent("rejected", device, round_idx, sha=sha))
        self.store.reject(round_idx, device, type(exc).__name__, str(exc)[:500])
        log.warning("rejected %s from %s: %s: %s", "update" if sha else "message", device,
                    type(exc).__name__, exc)
        try:
            self._ack(device, UpdateAck(round_idx, sha, "rejected", type(exc).__name__,
                                        str(exc)[:500]))
        except HFedMoEError:  # an id that cannot even form a topic
            pass


def _jsonable(cfg: Any) -> Any:
    import dataclasses

    if dataclasses.is_dataclass(cfg):
        return {f.name: _jsonable(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
                if f.name not in ("password", "dashboard_token")}
    if isinstance(cfg, (list, tuple)):
        return [_jsonable(v) for v in cfg]
    return cfg


class _Prometheus:
    """Optional Prometheus endpoint (prometheus-client); a no-op when the port is 0."""

    def __init__(self, port: int) -> None:
        self.enabled = port > 0
        if not self.enabled:
            return
        from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

        reg = CollectorRegistry()  # one per server, so several can live in one process
        self.server, self.thread = start_http_server(port, registry=reg)
        self.round = Gauge("hfedmoe_round", "current round", registry=reg)
        self.accuracy = Gauge("hfedmoe_eval_accuracy", "held-out accuracy", registry=reg)
        self.loss = Gauge("hfedmoe_eval_loss", "held-out loss", registry=reg)
        self.updates = Counter("hfedmoe_updates_total", "updates by outcome", ["outcome"],
                               registry=reg)

    def close(self) -> None:
        if self.enabled:
            self.server.shutdown()

    def set_round(self, r: int) -> None:
        if self.enabled:
            self.round.set(r)

    def count(self, outcome: str) -> None:
        if self.enabled:
            self.updates.labels(outcome).inc()

    def observe(self, row: dict[str, Any]) -> None:
        if self.enabled:
            if "accuracy" in row:
                self.accuracy.set(row["accuracy"])
            if "loss" in row:
                self.loss.set(row["loss"])


__all__ = ["Coordinator", "UnknownClientError"]


def _declared_examples(report: Any) -> int | None:
    """The local examples a device declared at registration (None: not declared)."""
    n = report.get("local_examples") if isinstance(report, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None
