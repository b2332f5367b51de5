"""What the device reads before it joins a round and while it trains (the rules it checks them
against are :mod:`hfedmoe.eligibility`).

Battery and temperature come from the device probes (:mod:`device_agent.resources`), a metered
network from NetworkManager and user idleness from systemd-logind where they run; a reading the
device cannot take is reported as unknown and never blocks it. Emulated readings (a JSON file,
re-read on every call) let a test or an operator play conditions to a running agent.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from device_agent.resources import probe_battery_temperature
from hfedmoe.eligibility import Conditions
from hfedmoe.errors import ConfigError

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
