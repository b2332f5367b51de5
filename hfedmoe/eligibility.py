"""Device eligibility: a device takes part in a round only while its conditions allow it.

Production cross-device FL trains only on devices that are charging or well charged, cool,
on an unmetered network and idle. The server sets the rules for the run (``[eligibility]`` in
its config, sent with every round announcement); a device may add stricter ones of its own
(the agent's ``[eligibility]``): :func:`combine` keeps the stricter of each.

The agent reads :class:`Conditions` (:mod:`device_agent.conditions`) before it joins a round and during training. A device that
does not meet a rule sits the round out and says why (its status message carries
``eligible: false`` and the reasons, which the server records, shows on the dashboard and puts
in the report). When conditions break mid-round, ``on_break`` says what happens to the partial
work: ``"send"`` stops training and sends what trained, ``"drop"`` sends nothing.

A reading the device cannot take (no battery, no thermal sensor, no NetworkManager to tell a
metered network, no logind session to tell user activity) never blocks it: it is reported as
unknown.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from hfedmoe.errors import ConfigError


@dataclass(frozen=True)
class EligibilityConfig:
    """The conditions under which a device trains.

    Attributes:
        min_battery_pct: below this battery level a device trains only while charging
            (0: no minimum).
        require_charging: train only while charging.
        max_temperature_c: above this temperature the device is too hot (0: no limit).
        allow_metered: train on a metered network (mobile data).
        require_idle: train only while the user is not using the device.
        on_break: conditions broke mid-round: ``"send"`` what trained so far, or ``"drop"`` it
            (empty: the other side's choice; ``"send"`` when neither says).
        check_every_s: how often the agent re-reads conditions while training.
    """

    min_battery_pct: float = 0.0
    require_charging: bool = False
    max_temperature_c: float = 0.0
    allow_metered: bool = True
    require_idle: bool = False
    on_break: Literal["send", "drop", ""] = ""
    check_every_s: float = 2.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_battery_pct <= 100:
            raise ConfigError("eligibility.min_battery_pct must be in [0, 100]")
        if self.max_temperature_c < 0 or self.check_every_s <= 0:
            raise ConfigError("eligibility.max_temperature_c must be >= 0 and check_every_s > 0")
        if self.on_break not in ("send", "drop", ""):
            raise ConfigError("eligibility.on_break must be 'send', 'drop' or empty")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def combine(server: EligibilityConfig, device: EligibilityConfig) -> EligibilityConfig:
    """The stricter of the server's and the device's rules, rule by rule; ``on_break`` is the
    device's where it sets one (it knows its app best), else the server's, else ``"send"``."""
    temps = [t for t in (server.max_temperature_c, device.max_temperature_c) if t > 0]
    return EligibilityConfig(
        min_battery_pct=max(server.min_battery_pct, device.min_battery_pct),
        require_charging=server.require_charging or device.require_charging,
        max_temperature_c=min(temps) if temps else 0.0,
        allow_metered=server.allow_metered and device.allow_metered,
        require_idle=server.require_idle or device.require_idle,
        on_break=device.on_break or server.on_break or "send",
        check_every_s=min(server.check_every_s, device.check_every_s))


@dataclass(frozen=True)
class Conditions:
    """What the device reads about itself; None: it cannot tell."""

    battery_pct: float | None = None
    charging: bool | None = None
    temperature_c: float | None = None
    metered: bool | None = None
    idle: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check(cond: Conditions, rules: EligibilityConfig) -> list[str]:
    """The reasons ``cond`` breaks ``rules`` (empty: eligible)."""
    reasons = []
    if rules.require_charging and cond.charging is False:
        reasons.append("not charging (the run trains only while charging)")
    if (rules.min_battery_pct > 0 and cond.battery_pct is not None and cond.charging is not True
            and cond.battery_pct < rules.min_battery_pct):
        reasons.append(f"battery {cond.battery_pct:.0f}% < {rules.min_battery_pct:.0f}% and "
                       f"not charging")
    if (rules.max_temperature_c > 0 and cond.temperature_c is not None
            and cond.temperature_c > rules.max_temperature_c):
        reasons.append(f"too hot: {cond.temperature_c:.1f} C > {rules.max_temperature_c:.1f} C")
    if not rules.allow_metered and cond.metered is True:
        reasons.append("on a metered network")
    if rules.require_idle and cond.idle is False:
        reasons.append("the device is in use")
    return reasons
