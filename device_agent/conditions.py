"""What the device reads before it joins a round and while it trains (the rules it checks them
against are :mod:`hfedmoe.eligibility`), and the gate that decides from them: whether the device
joins an announced round (:meth:`JoinGate.admits`) and whether it may go on training
(:meth:`JoinGate.check_training`).

Battery and temperature come from the device probes (:mod:`device_agent.resources`), a metered
network from NetworkManager and user idleness from systemd-logind where they run; a reading the
device cannot take is reported as unknown and never blocks it. Emulated readings (a JSON file,
re-read on every call) let a test or an operator play conditions to a running agent.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

from device_agent.privacy import DevicePrivacy, DevicePrivacyConfig, PrivacyLedger
from device_agent.resources import probe_battery_temperature
from hfedmoe.config import MethodConfig, from_dict
from hfedmoe.eligibility import Conditions, EligibilityConfig, check, combine
from hfedmoe.errors import ConfigError, HFedMoEError, PrivacyRefused, TransportError
from hfedmoe.protocol import DeviceStatus, RoundAnnouncement

log = logging.getLogger("hfedmoe.agent")

_PLAYED: dict[str, int] = {}  # emulated readings file -> readings already played


def read_conditions(emulated: str | Path = "") -> Conditions:
    """The device's conditions now: from ``emulated`` when given, else from the live probes
    (battery and temperature as the device report reads them; a metered network from
    NetworkManager and user idleness from systemd-logind where they run; unknown elsewhere,
    e.g. a headless board or Termux).

    ``emulated`` is a JSON file re-read on every call, so a test or an operator can change it
    while the agent runs. It holds one object of :class:`Conditions` fields, or a list of them
    played in order, one per reading, the last one staying (a battery that drains: the agent
    reads once before it joins a round and every ``check_every_s`` while it trains)."""
    if emulated:
        try:
            raw = json.loads(Path(emulated).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read emulated conditions {emulated}: {exc}") from exc
        if isinstance(raw, list) and raw:
            key = str(Path(emulated).resolve())
            idx = _PLAYED.get(key, 0)
            _PLAYED[key] = idx + 1
            raw = raw[min(idx, len(raw) - 1)]
        if not isinstance(raw, dict):
            raise ConfigError(f"{emulated}: conditions must be a JSON object or a non-empty "
                              f"list of them")
        unknown = set(raw) - set(Conditions.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"{emulated}: unknown condition field(s) {sorted(unknown)}")
        return Conditions(**raw)
    battery_pct, charging, temperature = probe_battery_temperature()
    return Conditions(battery_pct, charging, temperature, _metered(), _idle())


def _metered() -> bool | None:
    """NetworkManager's view of the connection (``GENERAL.METERED``: yes/no/unknown)."""
    nmcli = shutil.which("nmcli")
    if nmcli is None:
        return None
    try:
        out = subprocess.run([nmcli, "-t", "-f", "GENERAL.METERED", "dev", "show"],
                             capture_output=True, text=True, timeout=2).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    values = {line.split(":", 1)[1].split()[0] for line in out.splitlines()
              if line.startswith("GENERAL.METERED:") and ":" in line and line.split(":", 1)[1]}
    if "yes" in values:
        return True
    return False if values and values <= {"no"} else None


def _idle() -> bool | None:
    """systemd-logind's ``IdleHint`` of this process's session (yes/no), where there is one."""
    loginctl = shutil.which("loginctl")
    if loginctl is None:
        return None
    try:
        out = subprocess.run([loginctl, "show-session", "self", "-p", "IdleHint", "--value"],
                             capture_output=True, text=True, timeout=2)
    except (OSError, subprocess.SubprocessError):
        return None
    value = out.stdout.strip().lower() if out.returncode == 0 else ""
    return {"yes": True, "no": False}.get(value)


def privacy_reason(exc: PrivacyRefused) -> str:
    """The status reason of a round refused for privacy: ``"privacy:<code>: <why>"``."""
    return f"privacy:{exc.reason}: {exc}"


class ConditionsBroke(Exception):
    """Raised inside training when the device stopped being eligible and drops its work."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = reasons


class JoinGate:
    """Whether this device joins an announced round, and whether it may go on training.

    A device joins a round that names it, newer than its last one and still open, when its
    privacy settings allow it (:mod:`device_agent.privacy`) and the round's eligibility
    rules (the server's combined with its own: the stricter of each) hold now. Every change of
    its eligibility is published as a :class:`DeviceStatus` through ``publish``.

    Args:
        device_id: this device (the participant name and the log prefix).
        own_rules: the device's own eligibility rules.
        conditions_file: emulated readings (:func:`read_conditions`); "" reads the probes.
        local: the device's persisted state: ``last_round`` is read, ``dp_refused_round``
            is written (the caller saves it).
        publish: sends a status to the server; may raise :class:`TransportError`.
        clock: wall-clock seconds (the announcement's deadline is one).
        privacy: the device's privacy settings and epsilon ledger (None: no settings of its
            own, a ledger in memory).
    """

    def __init__(self, device_id: str, own_rules: EligibilityConfig, conditions_file: str,
                 local: MutableMapping[str, Any], publish: Callable[[DeviceStatus], None],
                 clock: Callable[[], float] = time.time,
                 privacy: DevicePrivacy | None = None) -> None:
        self.device_id = device_id
        self.privacy = privacy or DevicePrivacy(DevicePrivacyConfig(), PrivacyLedger(":memory:"))
        self.own_rules = own_rules
        self.conditions_file = conditions_file
        self.local = local
        self.publish = publish
        self.clock = clock
        self.rules = combine(EligibilityConfig(), own_rules)  # the round's (server's and own)
        self.checked_at = -1e9  # last eligibility check (clock)
        self.reported: tuple[int | None, tuple[str, ...]] | None = None  # (round, reasons) published

    def admits(self, ann: RoundAnnouncement) -> bool:
        """The join decision for ``ann``."""
        join = (ann.takes_part(self.device_id)
                and ann.round_idx > self.local.get("last_round", -1)
                and ann.deadline > self.clock())
        return join and self.within_privacy_budget(ann) and self.eligible_now(ann)

    def within_privacy_budget(self, ann: RoundAnnouncement) -> bool:
        """The device's privacy settings allow the round (:meth:`DevicePrivacy.admit_secagg`:
        secure aggregation with its own k where it demands it; :meth:`DevicePrivacy.admit`: the
        stricter of its own and the server's DP, and one more noised update within its epsilon
        budget); otherwise it sits the round out, sends nothing, and its status says why
        (once per round)."""
        try:
            method = from_dict(MethodConfig, dict(ann.method))
        except HFedMoEError:
            return True  # the round itself rejects a malformed announcement
        try:
            self.privacy.admit_secagg(ann.secagg)
            self.privacy.admit(method)
        except PrivacyRefused as exc:
            if self.local.get("dp_refused_round") != ann.round_idx:
                self.local["dp_refused_round"] = ann.round_idx
                log.warning("%s: sits out round %s: privacy (%s): %s", self.device_id,
                            ann.round_idx, exc.reason, exc)
                self.reported = (ann.round_idx, (privacy_reason(exc),))
                self._report(ann.round_idx, [privacy_reason(exc)], {})
            return False
        return True

    def eligible_now(self, ann: RoundAnnouncement) -> bool:
        """The round's eligibility rules hold now (checked every ``check_every_s`` while the
        round is open: a device that was plugged in meanwhile joins late). The server hears
        of every change."""
        try:
            server = from_dict(EligibilityConfig, dict(ann.eligibility))
        except HFedMoEError:
            server = EligibilityConfig()
        self.rules = combine(server, self.own_rules)
        now = self.clock()
        last = self.reported
        if last is not None and last[0] == ann.round_idx and last[1] \
                and now - self.checked_at < self.rules.check_every_s:
            return False
        self.checked_at = now
        cond = read_conditions(self.conditions_file)
        reasons = tuple(check(cond, self.rules))
        if last != (ann.round_idx, reasons):
            self.reported = (ann.round_idx, reasons)
            self._report(ann.round_idx, list(reasons), cond.to_dict())
            if reasons:
                log.warning("%s: sits out round %s: %s", self.device_id, ann.round_idx,
                            "; ".join(reasons))
        return not reasons

    def check_training(self, round_idx: int | None) -> None:
        """Called on every training step: every ``check_every_s``, read the conditions; when
        they broke, report it and stop (``on_break = "send"``: :class:`StopTraining`, the
        partial work is sent) or drop the round (:class:`ConditionsBroke`)."""
        now = self.clock()
        if now - self.checked_at < self.rules.check_every_s:
            return
        self.checked_at = now
        cond = read_conditions(self.conditions_file)
        reasons = check(cond, self.rules)
        if not reasons:
            return
        sending = self.rules.on_break == "send"
        log.warning("%s: conditions broke during round %s (%s): %s the partial work",
                    self.device_id, round_idx, "; ".join(reasons),
                    "sending" if sending else "dropping")
        self.reported = (round_idx, tuple(reasons))
        self._report(round_idx, reasons, cond.to_dict(), during_round=True, sending=sending)
        if self.rules.on_break == "drop":
            raise ConditionsBroke(reasons)
        from hfedmoe.trainer import StopTraining

        raise StopTraining("; ".join(reasons))

    def _report(self, round_idx: int | None, reasons: list[str], conditions: dict[str, Any],
                during_round: bool = False, sending: bool = False) -> None:
        status = DeviceStatus("online", eligible=not reasons, reasons=tuple(reasons),
                              conditions=conditions, round_idx=round_idx,
                              during_round=during_round, sending=sending)
        try:
            self.publish(status)
        except TransportError as exc:
            log.warning("%s: cannot report eligibility: %s", self.device_id, exc)
