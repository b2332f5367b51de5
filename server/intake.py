"""The update intake: one update's path from bytes on the wire to an acknowledgement.

An update that arrived whole (:class:`hfedmoe.transport.chunks.BlobReceiver`) is decoded and
validated against the model (:func:`hfedmoe.wire.decode_full`; LoRA factors expanded to exact
products), its ``num_examples`` held to the weighting policy, its experts to the device's
registered budget and the server's cap for its device class, its deltas to the policy's norm
bounds (refused or clipped: :mod:`server.bounds`), its round and base model to the open round's;
the aggregator then checks it against the updates already taken
(:meth:`hfedmoe.aggregator.Aggregator.check`), and only then is it spooled durably and its
participation recorded, in one transaction (:mod:`server.store`), folded into the aggregate and
acknowledged on the device's ack topic. When the store fails (StoreError: a database gone away,
a disk error) nothing is acknowledged and nothing is folded in: the device sends the update
again until its ack comes, and it is taken in once the store is back.
An update for an earlier round is late: folded into the open round under its own key
(``late_policy = "fold"``, one round late at most) or dropped, and acknowledged as such. A
rejected update (or registration) gets an error on the ack topic and a row in ``rejections``;
the global model is untouched.

The coordinator runs an intake, and so does each ingest worker (:mod:`server.ingest`): the
intake reads the open round from whoever holds it (:class:`server.rounds.RoundHolder`) and
tells what it did through ``notify`` (a worker publishes it to the coordinator, whose intake
counts it with :meth:`Intake.count`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from hfedmoe.errors import (
    AlgorithmError,
    BudgetExceededError,
    DiskFullError,
    HFedMoEError,
    MismatchError,
    PolicyError,
    StoreError,
)
from hfedmoe.lora import LoRASpec, expand, with_factors
from hfedmoe.names import ExpertId
from hfedmoe.protocol import IngestEvent, UpdateAck
from hfedmoe.strategies import Strategy
from hfedmoe.transport.base import Transport
from hfedmoe.transport.topics import Topics
from hfedmoe.update import SparseUpdate
from hfedmoe.wire import decode, decode_full, spec_from_state
from server.bounds import bound_norms, check_experts
from server.config import ServerConfig
from server.metrics import Prometheus
from server.registry import DeclaredExamples, UnknownClientError
from server.rounds import (
    RoundHolder,
    RoundState,
    disagreement_of,
    participation_record,
)
from server.store import StateStore, StoredUpdate

log = logging.getLogger("hfedmoe.server")
LATE_SEP = "~"  # "device~r3": a late update of round 3 folded into a later round


class Intake:
    """Takes updates in for one run: validate, spool, ack, by the coordinator's rules.

    Args:
        cfg: the server config (wire, policy, retention, late policy).
        transport: acks (and nothing else) go out on it.
        store: the run's store: devices, spool, participation, rejections.
        state: the model's state (the wire spec updates are checked against).
        holder: who holds the open round and its aggregator.
        strategy: the run's strategy (whether budgets bind).
        declared: the ``local_examples`` devices declared (the weighting policy's input).
        prom: the Prometheus counters (disabled when None).
        notify: told of every outcome (accepted, rejected, late); an ingest worker publishes it.
        lora_bases: the model's shared base weights that LoRA updates carry factors of
            (``MoEModel.lora_bases``).
    """

    def __init__(self, cfg: ServerConfig, transport: Transport, store: StateStore,
                 state: Mapping[str, Any], holder: RoundHolder, *, strategy: Strategy,
                 declared: DeclaredExamples, prom: Prometheus | None = None,
                 notify: Callable[[IngestEvent], None] | None = None,
                 lora_bases: Iterable[str] = ()) -> None:
        self.cfg = cfg
        self.transport = transport
        self.store = store
        self.holder = holder
        self.strategy = strategy
        self.declared = declared
        self.prom = prom if prom is not None else Prometheus(0)
        self.notify = notify if notify is not None else _ignore
        self.topics = Topics(cfg.run_id)
        # train.adapter = "lora": updates carry factors, expanded to exact products on arrival
        self.lora = (LoRASpec(cfg.train.lora_rank, cfg.train.lora_alpha)
                     if cfg.train.adapter == "lora" else None)
        self.spec = spec_from_state(state)
        if self.lora is not None:
            self.spec = with_factors(self.spec, self.lora, lora_bases)

    # --- an update's path --------------------------------------------------------------------
    def receive(self, prefix: str, blob: bytes) -> bool:
        """An update arrived whole on ``{prefix}``: take it in, or reject it, and ack.
        False when the store failed and nothing was acknowledged: the caller's receiver must
        then forget the transfer, so that the device's resend is taken in anew."""
        device, sha = self.topics.parse_update_prefix(prefix)
        round_idx = None
        try:
            if device not in self.store.devices():
                raise UnknownClientError(f"device {device!r} is not registered")
            header, update = decode_full(blob, self.spec, self.cfg.wire, run_id=self.cfg.run_id,
                                         client_id=device)
            if self.lora is not None:
                update = expand(update, self.lora)
            round_idx = header.round_idx
            update = self.check_weights(device, update)
            update = bound_norms(self.cfg.policy, device, update)
            if self.store.update(round_idx, device) is not None:  # a resend of an acked update
                self._ack(device, UpdateAck(round_idx, sha, "accepted"))
                return True
            r = self.holder.round
            if r is not None and round_idx == r.round_idx:
                self._accept(r, device, sha, blob, update)
            elif round_idx < (r.round_idx if r is not None else self.holder.next_round):
                self._late(device, round_idx, sha, blob, update)
            else:
                raise MismatchError(f"round: got {round_idx}, no such round is open")
        except StoreError as exc:  # nothing durable: no ack, the device sends it again
            self.prom.count("unstored")
            log.error("not acknowledging the update from %s (round %s): the store failed: %s",
                      device, round_idx, exc)
            return False
        except (HFedMoEError, AlgorithmError) as exc:
            self.reject(device, round_idx, exc, sha)
        return True

    def _accept(self, r: RoundState, device: str, sha: str, blob: bytes,
                update: SparseUpdate) -> None:
        """An update for the open round: check, aggregate, spool, record, count, ack."""
        if device not in r.participants:
            raise UnknownClientError(f"{device} is not a participant of round {r.round_idx}")
        if update.base_model_hash != r.base_hash:
            raise MismatchError(f"base_model_hash: got {update.base_model_hash[:12]}, "
                                f"expected {r.base_hash[:12]}")
        budget = self.check_budget(device, update)
        self.check_room(len(blob))  # DiskFullError before anything is taken in
        self.holder.aggregator.check(update)  # consistency, before anything is kept
        with self.store.transaction():  # the update and its record, or neither (no ack)
            self.store.spool_update(r.round_idx, device, blob, update.num_examples)
            self._record(r.round_idx, device, budget, update, len(blob))
        self.holder.aggregator.add(update)
        r.accepted[device] = len(blob)
        r.usage[device] = update.usage
        dis = disagreement_of(update)
        if dis is not None:
            r.disagreement[device] = dis
        self.prom.count("accepted")
        self._ack(device, UpdateAck(r.round_idx, sha, "accepted"))
        self.notify(IngestEvent(
            "accepted", device, r.round_idx, nbytes=len(blob),
            usage={str(e): v for e, v in update.usage.items()},
            disagreement=r.disagreement.get(device)))

    def _late(self, device: str, round_idx: int, sha: str, blob: bytes,
              update: SparseUpdate) -> None:
        r = self.holder.round
        self._count_late()
        fold = (self.cfg.rounds.late_policy == "fold" and r is not None
                and round_idx == r.round_idx - 1)
        if fold:
            # counted in the open round under its own key, so the device's own update for
            # this round is not a duplicate
            key = f"{device}{LATE_SEP}r{round_idx}"
            try:
                self.check_budget(device, update)
                self.check_room(len(blob))
                keyed = dataclasses.replace(update, client_id=key)
                self.holder.aggregator.check(keyed)
            except (AlgorithmError, BudgetExceededError, DiskFullError) as exc:
                self.reject(device, round_idx, exc, sha)
                return
            self.store.spool_update(r.round_idx, key, blob, update.num_examples, late=True)
            self.holder.aggregator.add(keyed)
        self._ack(device, UpdateAck(round_idx, sha, "late-folded" if fold else "late-dropped"))
        self.notify(IngestEvent("late", device, round_idx))
        log.info("late update from %s for round %d %s", device, round_idx,
                 "folded into the open round" if fold else "dropped")

    # --- the checks ----------------------------------------------------------------------------
    def check_budget(self, device: str, update: SparseUpdate) -> int:
        """The device's registered budget; raises BudgetExceededError when the update carries
        more experts than it, or than the server's cap for the device's class
        (:func:`server.bounds.check_experts`).

        fedavg-full ignores budgets by design (every device trains every expert)."""
        info = self.store.devices().get(device, {})
        budget = int(info.get("budget", 0))
        check_experts(self.cfg.policy, info.get("report"), budget, update,
                      self.strategy.uses_budget)
        return budget

    def check_room(self, nbytes: int) -> None:
        ret = self.cfg.retention
        try:
            self.store.check_room(nbytes, int(ret.min_free_mb * 2**20),
                                  int(ret.max_run_dir_mb * 2**20))
        except DiskFullError as exc:
            log.error("refusing updates: %s", exc)
            raise

    def check_weights(self, device: str, update: SparseUpdate) -> SparseUpdate:
        """Apply the weighting policy to ``num_examples`` (PolicyError, or clipped)."""
        declared = self.declared.get()
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

    def _record(self, round_idx: int, device: str, budget: int, update: SparseUpdate,
                nbytes: int) -> None:
        rec = participation_record(budget, update, nbytes)
        self.store.record_participation(round_idx, device, rec.budget, rec.experts_sent,
                                        rec.optimizer_experts, rec.info())

    # --- refusals and counts -----------------------------------------------------------------
    def on_transfer_error(self, prefix: str, exc: Exception) -> None:
        """A transfer that cannot complete (too large, corrupt, timed out): tell the device."""
        try:
            device, sha = self.topics.parse_update_prefix(prefix)
        except HFedMoEError:
            return
        if device in self.store.devices():
            r = self.holder.round
            self.reject(device, None if r is None else r.round_idx, exc, sha)

    def reject(self, device: str, round_idx: int | None, exc: Exception,
               sha: str = "") -> None:
        """Refuse a device's update (``sha`` set) or message: count it, keep a row in
        ``rejections`` and send the error on the device's ack topic."""
        self._count_rejected(device, round_idx, sha)
        self.notify(IngestEvent("rejected", device, round_idx, sha=sha))
        try:
            self.store.reject(round_idx, device, type(exc).__name__, str(exc)[:500])
        except StoreError as store_exc:  # the refusal still goes out; its row cannot
            log.error("rejection of %s's %s not recorded: %s", device,
                      "update" if sha else "message", store_exc)
        log.warning("rejected %s from %s: %s: %s", "update" if sha else "message", device,
                    type(exc).__name__, exc)
        try:
            self._ack(device, UpdateAck(round_idx, sha, "rejected", type(exc).__name__,
                                        str(exc)[:500]))
        except HFedMoEError:  # an id that cannot even form a topic
            pass

    def count(self, event: IngestEvent) -> None:
        """What an ingest worker's intake did, counted in the open round as if taken here
        (its spool and database rows are the durable record; this drives the round's
        progress)."""
        r = self.holder.round
        if event.kind == "rejected":
            self._count_rejected(event.device, event.round_idx, event.sha)
        elif event.kind == "late":
            self._count_late()
        elif r is not None and event.round_idx == r.round_idx:  # accepted
            self.prom.count("accepted")
            r.accepted[event.device] = event.nbytes
            try:
                r.usage[event.device] = {ExpertId.parse(e): float(v)
                                         for e, v in event.usage.items()}
            except HFedMoEError:
                pass
            if event.disagreement is not None:
                r.disagreement[event.device] = float(event.disagreement)

    def _count_rejected(self, device: str, round_idx: int | None, sha: str) -> None:
        r = self.holder.round
        if r is not None:
            r.rejected += 1
            if sha and round_idx == r.round_idx:
                r.refused.add(device)
        self.prom.count("rejected")

    def _count_late(self) -> None:
        r = self.holder.round
        if r is not None:
            r.late += 1
        self.prom.count("late")

    # --- the spool ---------------------------------------------------------------------------
    def read_back(self, stored: StoredUpdate) -> SparseUpdate:
        """An acknowledged update read back from the spool, under its aggregation key (a
        folded late update keeps its own, ``device~r{round}``)."""
        device = stored.client_id.split(LATE_SEP)[0]
        update = decode(self.store.read_update(stored), self.spec, self.cfg.wire,
                        run_id=self.cfg.run_id, client_id=device, base_model_hash=None)
        if self.lora is not None:
            update = expand(update, self.lora)
        # the spool keeps the bytes as sent: an update clipped on arrival is clipped again
        # (an update the bounds refuse never reaches the spool), and its num_examples is the
        # one accepted (the weighting policy may have clipped it), as the store recorded it
        update = bound_norms(self.cfg.policy, device, update, mode="clip")
        update = dataclasses.replace(update, num_examples=stored.num_examples)
        if stored.late:
            update = dataclasses.replace(update, client_id=stored.client_id)
        return update

    def _ack(self, device: str, message: UpdateAck) -> None:
        self.transport.publish(self.topics.ack(device), message.to_bytes())


def _ignore(event: IngestEvent) -> None:
    """The coordinator's own intake tells no one: it counts its outcomes itself."""
