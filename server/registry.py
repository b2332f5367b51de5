"""The device registry: registrations, online/offline status and eligibility reports.

A device registers on ``register/{device}`` with its budget and a report
(:class:`hfedmoe.protocol.Registration`); the registry checks its id, the size and the
``local_examples`` it declares, and whether the run allows it, then commits registrations in
batches (one transaction, one fsync) before acknowledging them: an ack means durable. Status
messages keep each device online or offline in the store; a status that carries an
eligibility report is kept for the dashboard, and a participant of the open round that is not
eligible sits the round out (recorded with its reasons). A refused registration goes to the
update intake's rejection path (:meth:`server.intake.Intake.reject`): an error on the device's
ack topic and a row in ``rejections``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from hfedmoe.errors import HFedMoEError, PolicyError, ProtocolError, StoreError, WireError
from hfedmoe.protocol import DeviceStatus, Registered, Registration
from hfedmoe.transport.base import Message, Transport
from hfedmoe.transport.topics import Topics, check_device_id
from server.config import ServerConfig
from server.rounds import RoundHolder
from server.store import StateStore

REGISTRATION_BATCH = 512  # registrations committed (one fsync) and acked together, at most

log = logging.getLogger("hfedmoe.server")


class UnknownClientError(WireError):
    """An update or request from a device that is not registered (or not allowed)."""


def declared_examples(report: Any) -> int | None:
    """The local examples a device declared at registration (None: not declared)."""
    n = report.get("local_examples") if isinstance(report, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


class DeclaredExamples:
    """``local_examples`` each registered device declared (the weighting policy's input),
    read from the store and recomputed only after registrations (:meth:`invalidate`) or when
    the number of known devices changed."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self._declared: dict[str, int | None] | None = None
        self._dirty = True

    def invalidate(self) -> None:
        self._dirty = True

    def get(self) -> dict[str, int | None]:
        devices = self.store.devices()
        if self._declared is None or len(self._declared) != len(devices) or self._dirty:
            self._declared = {d: declared_examples(info["report"]) for d, info in devices.items()}
            self._dirty = False
        return self._declared


Reject = Callable[[str, int | None, Exception], None]  # device, round, why


class Registry:
    """Registrations, device status and eligibility reports of one run.

    Args:
        cfg: the server config (policy, allowed devices, the registration size limit).
        transport: the coordinator's transport (acks go out on it).
        store: the run's store (the devices table).
        holder: who holds the open round (eligibility reports may take a participant out).
        reject: refuses a device's message (the intake's :meth:`~server.intake.Intake.reject`).
        declared: the policy's view of declared ``local_examples``, invalidated on commit.
        clock: wall clock (``time.time``).
    """

    def __init__(self, cfg: ServerConfig, transport: Transport, store: StateStore,
                 holder: RoundHolder, reject: Reject, declared: DeclaredExamples,
                 clock: Callable[[], float]) -> None:
        self.cfg = cfg
        self.transport = transport
        self.store = store
        self.holder = holder
        self.reject = reject
        self.declared = declared
        self.clock = clock
        self.topics = Topics(cfg.run_id)
        # device -> its latest eligibility report (eligible, reasons, conditions, round, at)
        self.eligibility: dict[str, dict[str, Any]] = {}
        self._pending: dict[str, tuple[str, dict[str, Any], int]] = {}

    def subscribe(self) -> None:
        self.transport.subscribe(self.topics.all_register(), self.on_register)
        self.transport.subscribe(self.topics.all_status(), self.on_status)

    def online(self) -> dict[str, dict[str, Any]]:
        """The registered devices whose last status is online."""
        return {d: info for d, info in self.store.devices().items() if info["status"] == "online"}

    def wait_online(self, min_devices: int, timeout: float,
                    tick: Callable[[], None]) -> dict[str, dict[str, Any]]:
        """The online devices once ``min_devices`` are online or ``timeout`` seconds pass
        (pumping the transport, ``tick`` between pumps); with none online, it keeps waiting:
        a round without devices is pointless."""
        ok = self.transport.run_until(lambda: len(self.online()) >= min_devices,
                                      timeout=timeout, tick=tick)
        while not self.online():
            log.info("waiting for a device to register")
            self.transport.run_until(lambda: bool(self.online()), timeout=30.0, tick=tick)
        online = self.online()
        if not ok:
            log.warning("only %d of %d devices online after %.0fs; starting anyway",
                        len(online), min_devices, timeout)
        return online

    def known(self, device: str) -> bool:
        return device in self.store.devices()

    # --- registration ----------------------------------------------------------------------
    def on_register(self, message: Message) -> None:
        """Check a registration and queue it; flushed at once when the transport is idle or
        a batch is full, else by the coordinator's next :meth:`flush`."""
        device = self.topics.parse(message.topic)[-1]
        try:
            check_device_id(device)  # ReservedIdError: "server" is the coordinator's account
            reg = Registration.from_bytes(message.payload, self.cfg.max_register_bytes)
            self._check(device, reg)
        except (ValueError, HFedMoEError) as exc:
            self.reject(device, None, exc)
            return
        self._pending[device] = (device, dict(reg.report), reg.budget)
        if self.transport.pending() == 0 or len(self._pending) >= REGISTRATION_BATCH:
            self.flush()

    def _check(self, device: str, reg: Registration) -> None:
        declared = reg.local_examples
        if declared is not None and declared > self.cfg.policy.max_registered_examples:
            raise PolicyError(f"registration declares local_examples={declared!r} (an int "
                              f"in [0, {self.cfg.policy.max_registered_examples}])")
        allowed = self.cfg.rounds.allowed_devices
        if allowed and device not in allowed:
            raise UnknownClientError(f"device {device!r} is not allowed in this run")

    def flush(self) -> None:
        """Commit the registrations taken since the last flush in one transaction, then ack
        them: a burst of thousands costs one fsync, and an ack still means durable."""
        if not self._pending:
            return
        rows = list(self._pending.values())
        self._pending.clear()
        try:
            self.store.upsert_devices(rows)
        except StoreError as exc:  # not durable, not acked: the devices register again
            log.error("%d registration(s) not recorded: %s", len(rows), exc)
            return
        self.declared.invalidate()
        for device, _, budget in rows:
            log.debug("device %s registered (budget %d)", device, budget)
            self.transport.publish(self.topics.ack(device), Registered(self.cfg.run_id).to_bytes())
        log.info("%d device(s) registered (%d known)", len(rows), len(self.store.devices()))

    # --- status and eligibility --------------------------------------------------------------
    def on_status(self, message: Message) -> None:
        device = self.topics.parse(message.topic)[-1]
        try:
            status = DeviceStatus.from_bytes(message.payload)
        except ProtocolError:
            return
        if not self.known(device):
            return
        self.store.set_device_status(device, status.state)
        if status.eligible is not None:
            self.on_eligibility(device, status)

    def on_eligibility(self, device: str, status: DeviceStatus) -> None:
        """A device's eligibility report: kept for the dashboard; a participant that is not
        eligible sits the round out (the round stops waiting for it) and the skip is
        recorded with its reasons."""
        reasons, conditions = list(status.reasons), dict(status.conditions)
        self.eligibility[device] = {"eligible": status.eligible, "reasons": reasons,
                                    "conditions": conditions, "round": status.round_idx,
                                    "at": self.clock()}
        r = self.holder.round
        if status.eligible or status.sending or r is None or status.round_idx != r.round_idx \
                or device not in r.participants or device in r.accepted:
            return  # a device whose conditions broke mid-round but sends its partial work
        r.skipped[device] = reasons
        r.refused.add(device)
        self.store.record_skip(r.round_idx, device, reasons, conditions, status.during_round)
        log.info("%s sits round %d out: %s", device, r.round_idx, "; ".join(reasons))

