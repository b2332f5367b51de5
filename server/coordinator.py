"""The round state machine: open a round, collect its updates, aggregate, evaluate, close.

All work happens on one thread that pumps the transport; transport callbacks only enqueue.
The coordinator composes the device registry (:mod:`server.registry`: registrations, status,
eligibility reports), the update intake (:mod:`server.intake`: decode, policy, budget, spool,
ack), the model's shards (:mod:`server.shards`), the Prometheus endpoint
(:mod:`server.metrics`) and, with ingest workers, its end of sharded ingestion
(:class:`server.ingest.IngestLink`). It keeps the rounds: choose the participants, announce,
wait for the updates until the deadline, fold them into the global model, evaluate,
checkpoint and write the metrics row (:mod:`server.rounds`). Every update is spooled before
it is acknowledged (:mod:`server.store`), so a SIGKILL at any point is recovered by
:meth:`Coordinator.resume`. A store that fails while a round opens or closes (a database gone
away) is waited out: each write is tried again with a bounded backoff for up to
``store.outage_limit_s`` (:mod:`server.store.outage`), and what was computed once (the
aggregate, the metrics row) is not computed again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hfedmoe.data import PairDataset, TextDataset
from hfedmoe.errors import StoreError
from hfedmoe.models.base import MoEModel
from hfedmoe.modelsync import build_shards
from hfedmoe.names import ExpertId
from hfedmoe.protocol import Done, RoundAnnouncement
from hfedmoe.transport.base import Message, Transport
from hfedmoe.transport.chunks import BlobReceiver
from hfedmoe.transport.topics import Topics
from server.bounds import round_strategy
from server.config import ServerConfig, ingestion_mode, redact_url
from server.evaluate import held_out_metrics
from server.ingest import IngestLink
from server.intake import LATE_SEP, Intake
from server.metrics import Prometheus
from server.registry import DeclaredExamples, Registry, UnknownClientError
from server.rounds import (
    RoundState,
    choose_participants,
    dense_update_bytes,
    evaluates,
    initial_row,
    noised_updates,
    round_row,
    routing_prior,
    updates_expected,
)
from server.secure_round import SecureRounds
from server.shards import ModelShards
from server.store import open_store
from server.store.outage import Durable

log = logging.getLogger("hfedmoe.server")


class Coordinator:
    """Runs federated rounds for one run directory.

    Args:
        cfg: the server config.
        transport: a connected transport (MQTT or in-memory).
        model: the server's model (global state lives in it between rounds).
        test_data: the held-out split for evaluation (``Task.held_out``; the rows name it
            as ``eval_split``, from ``cfg.data.eval_split``).
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
        self.durably = Durable(cfg.store.outage_limit_s)  # opening/closing waits out outages
        self.topics = Topics(cfg.run_id)
        self.store = open_store(cfg)
        self.strategy = round_strategy(cfg)
        self.global_state = model.state()
        # what one dense (fedavg-full) update of this model weighs on the wire, uncompressed
        self.dense_bytes = dense_update_bytes(self.global_state, cfg.wire.dtype)
        self.round: RoundState | None = None
        self.next_round = 0
        # the global routing prior the rounds announce (server.rounds.routing_prior); rebuilt
        # from the next round's updates after a restart
        self.prior: dict[ExpertId, float] = {}
        self.aggregator = self.strategy.make_aggregator()
        self.metrics_path = Path(cfg.run_dir) / "metrics.jsonl"
        self._receiver: BlobReceiver | None = None
        self._prom = Prometheus(cfg.prometheus_port)
        declared = DeclaredExamples(self.store)
        self.intake = Intake(cfg, transport, self.store, self.global_state, self,
                             strategy=self.strategy, declared=declared, prom=self._prom,
                             lora_bases=model.lora_bases)
        self.registry = Registry(cfg, transport, self.store, self, self.intake.reject, declared,
                                 clock)
        self.ingest = IngestLink(cfg, transport, self.store, self.intake)  # ingest workers
        self.shards = ModelShards(cfg, transport, self.registry.known)
        self.secure = SecureRounds(cfg.secagg, self.strategy.rule, transport, self.topics, clock,
                                   self.intake.reject)  # [secagg]: secure rounds
        self.on_tick: Callable[[], None] | None = None  # e.g. restarting ingest workers
        # called on this thread with "tick" (between pumps while waiting), "open" and "close"
        # (a round): the dashboard's snapshots
        self.hooks: list[Callable[[str], None]] = []
        self.dashboard: Any = None  # server.dashboard.Dashboard when dashboard_port is set

    @property
    def eligibility(self) -> dict[str, dict[str, Any]]:
        """device -> its latest eligibility report (the registry's)."""
        return self.registry.eligibility

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Subscribe and recover state from the run directory."""
        t = self.transport
        self.registry.subscribe()
        t.subscribe(self.topics.all_fetches(), self._on_fetch)
        if sharded := self.cfg.ingest.workers > 0:
            self.ingest.subscribe()
        self._receiver = BlobReceiver(
            t, self.topics.all_update_pieces() if sharded else self.topics.all_updates(),
            self.secure.receiver(self._on_update_blob),
            request_topic=self.topics.update_request_for,
            on_error=self.intake.on_transfer_error,
            retry_after=self.cfg.transport.retry_after, timeout=self.cfg.transport.transfer_timeout,
            max_bytes=self.cfg.wire.max_payload_bytes)
        t.wait_subscribed()
        _keep_config(self.store, self.cfg)
        self.resume()
        log.info("ready: run %s, %d device(s) known; %s", self.cfg.run_id,
                 len(self.store.devices()), ingestion_mode(self.cfg)["text"])
        if self.cfg.dashboard_port:
            from server.dashboard import Dashboard

            self.dashboard = Dashboard(self).start()

    def _on_update_blob(self, prefix: str, blob: bytes) -> None:
        if not self.intake.receive(prefix, blob) and self._receiver is not None:
            self._receiver.forget(prefix)  # not stored, not acked: take the resend anew

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
                    if stored.late:  # a folded late update keeps its own aggregation key
                        self.round.late += 1
                    else:
                        self.round.accepted[stored.client_id] = stored.num_bytes
                    self.aggregator.add(self.intake.read_back(stored))
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
                self._open_round(self.next_round, participants, None, announce=True)
            self._collect()
            rows.append(self._close_round())
        self._announce(Done(self.cfg.rounds.rounds))
        return rows

    def close(self) -> None:
        if self.dashboard is not None:
            self.dashboard.close()
        self.shards.close()
        if self._receiver is not None:
            self._receiver.close()
        self._prom.close()
        self.store.close()

    # --- rounds ------------------------------------------------------------------------------
    def _choose_participants(self) -> list[str]:
        rc = self.cfg.rounds
        online = self.registry.wait_online(rc.min_devices, rc.registration_timeout_s, self._tick)
        return choose_participants(online, self.next_round, fraction=rc.fraction, seed=rc.seed,
                                   over_select=rc.over_select)

    def _open_round(self, round_idx: int, participants: list[str], deadline: float | None,
                    announce: bool) -> None:
        """Its row in the store, then the announcement; a new round (``deadline`` None) gets
        its deadline when the row is written: a store outage does not eat the devices' time."""
        manifest = self.shards.publish(self.global_state)
        rc = self.cfg.rounds

        def write_row() -> float:
            due = self.clock() + rc.deadline_s if deadline is None else deadline
            self.store.open_round(round_idx, due, participants, manifest.state_hash)
            return due
        deadline = self.durably(f"opening round {round_idx}", write_row)
        self.round = RoundState(round_idx, participants, deadline, manifest.state_hash, manifest,
                                updates_expected(len(participants), rc.min_updates,
                                                 rc.over_select))
        self.aggregator = self.strategy.make_aggregator()
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
                prior={str(e): v for e, v in sorted(self.prior.items())}, model=manifest,
                secagg=self.secure.open(round_idx, participants, deadline, self.global_state)))
        self._prom.set_round(round_idx)
        log.info("round %d open: %d participant(s), wait for %d, deadline in %.0fs", round_idx,
                 len(participants), self.round.expected, deadline - self.clock())
        self._hook("open")

    def _collect(self) -> None:
        r = self.round
        assert r is not None

        def finished() -> bool:
            if self.secure.active:
                return self.secure.finished()
            if len(r.accepted) >= r.expected:
                return True
            online = self.registry.online()
            waiting = [p for p in r.participants
                       if p not in r.accepted and p not in r.refused and p in online]
            return not waiting or self.clock() >= r.deadline

        while not finished():
            self.transport.pump(timeout=0.1)
            self.registry.flush()
            if self.on_tick is not None:
                self.on_tick()
            self._hook("tick")
            if self._receiver is not None:
                self._receiver.poll()

    def _close_round(self) -> dict[str, Any]:
        """Aggregate (once), evaluate, checkpoint, write the row; store outages waited out."""
        r = self.round
        assert r is not None
        closing = f"closing round {r.round_idx}"
        self.durably(closing, lambda: self.store.set_round_state(r.round_idx, "aggregating"))
        report, agg_s = self.durably(closing, lambda: self._aggregate(r))
        if r.accepted:
            devices = self.store.devices()
            self.prior = routing_prior(self.prior, {d: r.usage[d] for d in r.accepted
                                                    if d in r.usage},
                                       {d: int(devices.get(d, {}).get("local_examples") or 1)
                                        for d in r.accepted})
        metrics = (self._evaluate() if evaluates(r.round_idx, self.cfg.rounds.rounds,
                                                  self.cfg.eval_every) else {})
        new_hash, _ = build_shards(self.global_state)
        row = {**self.durably(closing, lambda: self._round_row(r, report, metrics, agg_s)),
               **self.secure.row()}
        if "privacy" in row:
            log.info("round %d: privacy: epsilon <= %.3f at delta %g (max over devices)",
                     r.round_idx, row["privacy"]["epsilon_max"], row["privacy"]["delta"])
        kept = {k: v for k, v in row.items() if k not in ("devices",)}
        self.durably(closing, lambda: self.store.save_checkpoint(
            r.round_idx, self.global_state, kept, new_hash.state_hash))
        shutil.rmtree(Path(self.cfg.run_dir) / "partials" / f"r{r.round_idx}",
                      ignore_errors=True)  # the checkpoint holds the round now
        freed = _retain(self.store, self.cfg, r.round_idx)
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
        """Fold the round's updates into the global model; its report and the seconds taken.
        Repeatable after a StoreError (the store is read before anything is folded)."""
        t0 = time.perf_counter()
        if self.cfg.ingest.workers > 0:
            self.ingest.gather(r, self.aggregator)
        report = self.aggregator.report()
        if self.secure.active:
            new_state = self.secure.finalize(self.global_state, r.accepted)
        elif self.aggregator.num_clients:
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
        noised = noised_updates(self.store.participation(), self.cfg.method.dp_noise_multiplier)
        round_s = self.clock() - r.started
        return round_row(
            r.round_idx, participants=r.participants, accepted=r.accepted, report=report,
            metrics=metrics,
            budgets={d: info["budget"] for d, info in self.store.devices().items()},
            records={p["client"]: p for p in self.store.participation(r.round_idx)},
            usage=r.usage, disagreement=r.disagreement, dense_bytes=self.dense_bytes,
            method=self.cfg.method, noised_updates=noised, aggregation_s=agg_s,
            round_s=round_s, wall_s=round_s, num_experts=len(self.model.expert_ids()),
            rejected=r.rejected, late=r.late,
            bytes_out=r.bytes_out, skipped=r.skipped)

    def _tick(self) -> None:
        """Between pumps while waiting for devices: commit registrations, then the hooks."""
        self.registry.flush()
        self._hook("tick")

    def _hook(self, event: str) -> None:
        for hook in self.hooks:
            hook(event)

    def _evaluate(self) -> dict[str, Any]:
        has_test = self.test_data is not None and len(self.test_data) > 0
        return held_out_metrics(self.model, self.test_data, self.cfg) if has_test else {}

    def _write_metrics(self, row: dict[str, Any]) -> dict[str, Any]:
        return _append_row(self.metrics_path, {"time": self.clock(), **row})

    # --- messages ----------------------------------------------------------------------------
    def _announce(self, message: RoundAnnouncement | Done) -> None:
        self.transport.publish(self.topics.round(), message.to_bytes(), retain=True)

    def _on_fetch(self, message: Message) -> None:
        sent = self.shards.on_fetch(message)
        if self.round is not None:
            self.round.bytes_out += sent


__all__ = ["LATE_SEP", "Coordinator", "RoundState", "UnknownClientError"]


def _keep_config(store: Any, cfg: ServerConfig) -> None:
    """The run's config in the store's meta table, without secrets (the database password)."""
    kept = _jsonable(cfg)
    kept["store"]["url"] = redact_url(cfg.store.url)
    store.set_meta("config", json.dumps(kept))


def _retain(store: Any, cfg: ServerConfig, done_round: int) -> int:
    """Retention after a durable round; the bytes freed. A store failure defers it to the
    next round's close (pruning covers every round up to the one it is given)."""
    ret = cfg.retention
    try:
        return store.prune(done_round, ret.keep_updates, ret.keep_checkpoints, ret.keep_best)
    except StoreError as exc:
        log.warning("round %d: retention deferred to the next round: %s", done_round, exc)
        return 0


def _append_row(path: Any, row: dict[str, Any]) -> dict[str, Any]:
    """Append ``row`` to the metrics file as a JSON line; returns it."""
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    return row


def _jsonable(cfg: Any) -> Any:
    """A config as JSON-ready values, without its secrets (password, dashboard token)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: _jsonable(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
                if f.name not in ("password", "dashboard_token")}
    if isinstance(cfg, (list, tuple)):
        return [_jsonable(v) for v in cfg]
    return cfg
