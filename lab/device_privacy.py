"""The simulated devices' own privacy: the ``[devices]`` section of a simulation config.

A live device's ``[privacy]`` section (:mod:`device_agent.privacy`) is its floor under the
server's DP settings and says how its loss, usage and importance leave it. A simulation gives
its emulated devices the same section, for every device and per device:

```toml
[devices.privacy]              # every simulated device's [privacy] section
max_clip = 1.0
min_noise_multiplier = 1.0

[[devices.overrides]]          # these devices' section differs, key by key
profiles = ["phone-midrange-6gb"]   # devices of these profiles (empty: any profile)
indices = [0, 3]                    # devices of these indices (empty: any index)
from_round = 2                      # from this round on (0: from the first)
privacy = { min_noise_multiplier = 2.0, usage = "withheld" }
```

A device's section in round r is ``devices.privacy`` with the keys of every override that
matches it (all its selectors hold, ``from_round <= r``) applied in the order they are
written, the later winning. An override from a round on is a device whose owner changed its
settings mid-run: its ledger keeps the updates sent before, each at its own noise, as a
restarted agent's does. Each device applies its section through the live agent's
:class:`~device_agent.privacy.DevicePrivacy`: the stricter of its own and the announced
settings, refusal of a round it cannot make private enough or that would pass its epsilon
budget, and the metadata release.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from device_agent.privacy import DevicePrivacy, DevicePrivacyConfig, PrivacyLedger
from hfedmoe.config import MethodConfig, from_dict, to_dict
from hfedmoe.errors import ConfigError
from server.config import ServerConfig


@dataclass(frozen=True)
class DevicePrivacyOverride:
    """Some devices' ``[privacy]`` keys, over ``devices.privacy``.

    Attributes:
        profiles: the devices of these profile names (empty: any profile).
        indices: the devices of these indices (0-based, as ``--devices`` counts; empty: any).
        from_round: from this round on (0: every round).
        privacy: ``[privacy]`` keys (:class:`~device_agent.privacy.DevicePrivacyConfig`).
    """

    profiles: tuple[str, ...] = ()
    indices: tuple[int, ...] = ()
    from_round: int = 0
    privacy: dict[str, Any] = field(default_factory=dict)

    def matches(self, index: int, profile: str, round_idx: int) -> bool:
        return ((not self.profiles or profile in self.profiles)
                and (not self.indices or index in self.indices)
                and round_idx >= self.from_round)


@dataclass(frozen=True)
class SimDevicesConfig:
    """The simulated devices' own settings (module docstring).

    Attributes:
        privacy: every device's ``[privacy]`` section (the default: none of its own, the
            announced settings as they are).
        overrides: some devices' keys over it, from some round on.
    """

    privacy: DevicePrivacyConfig = field(default_factory=DevicePrivacyConfig)
    overrides: tuple[DevicePrivacyOverride, ...] = ()

    def __post_init__(self) -> None:
        for i, o in enumerate(self.overrides):
            where = f"devices.overrides[{i}]"
            if o.from_round < 0:
                raise ConfigError(f"{where}.from_round must be >= 0, got {o.from_round}")
            if any(x < 0 for x in o.indices):
                raise ConfigError(f"{where}.indices must be device indices >= 0, got "
                                  f"{list(o.indices)}")
            _merged(self.privacy, [o.privacy], f"{where}.privacy")  # keys and values checked

    def privacy_for(self, index: int, profile: str, round_idx: int) -> DevicePrivacyConfig:
        """Device ``index`` (of ``profile``)'s ``[privacy]`` section in round ``round_idx``."""
        return _merged(self.privacy, [o.privacy for o in self.overrides
                                      if o.matches(index, profile, round_idx)],
                       "devices.privacy")


def _merged(base: DevicePrivacyConfig, changes: list[dict[str, Any]],
            where: str) -> DevicePrivacyConfig:
    """``base`` with the keys of each of ``changes`` in turn, validated as a ``[privacy]``
    section (:class:`ConfigError` naming ``where`` and the key)."""
    if not changes:
        return base
    values = to_dict(base)
    for c in changes:
        values.update(c)
    try:
        return from_dict(DevicePrivacyConfig, values, prefix=where)
    except ConfigError as exc:
        text = str(exc)  # the section's own checks name the key as privacy.<key>
        raise ConfigError(text if where in text else f"{where}: {text}") from exc


@dataclass(frozen=True)
class SimulationConfig(ServerConfig):
    """What ``hfedmoe simulate`` reads: the server's config and ``[devices]``, the simulated
    devices' own settings (a live server refuses the section: its devices have their own)."""

    devices: SimDevicesConfig = field(default_factory=SimDevicesConfig)


def devices_of(cfg: Any) -> SimDevicesConfig:
    """The ``[devices]`` section of ``cfg`` (a plain server config: the defaults)."""
    return cfg.devices if isinstance(cfg, SimulationConfig) else SimDevicesConfig()


def check_overrides(devices: SimDevicesConfig, num_devices: int, profiles: list[str]) -> None:
    """Refuse an override that names a device index or a profile this run has none of (a
    typo would otherwise leave those devices at the common settings, silently)."""
    for i, o in enumerate(devices.overrides):
        for x in o.indices:
            if x >= num_devices:
                raise ConfigError(f"devices.overrides[{i}].indices: {x} is not a device of "
                                  f"this run (indices 0-{num_devices - 1})")
        for p in o.profiles:
            if p not in profiles:
                raise ConfigError(f"devices.overrides[{i}].profiles: no device of this run "
                                  f"has profile {p!r} (it has {', '.join(sorted(set(profiles)))})")


def new_device_privacy(devices: SimDevicesConfig, index: int, profile: str) -> DevicePrivacy:
    """A simulated device's privacy as of round 0, its ledger in memory (a simulation is not
    resumed, so nothing needs to outlive it)."""
    return DevicePrivacy(devices.privacy_for(index, profile, 0), PrivacyLedger(":memory:"))


def admit_round(privacy: DevicePrivacy, devices: SimDevicesConfig, index: int, profile: str,
                round_idx: int, method: MethodConfig,
                secagg: dict[str, Any]) -> MethodConfig:
    """The round's settings as device ``index`` applies them: its section of this round
    (:meth:`SimDevicesConfig.privacy_for`), then the live agent's checks
    (:meth:`DevicePrivacy.admit_secagg`, :meth:`DevicePrivacy.admit`).

    Raises:
        PrivacyRefused: the device sits the round out
            (:func:`device_agent.conditions.privacy_reason` says why, as its status would).
    """
    privacy.cfg = devices.privacy_for(index, profile, round_idx)
    privacy.admit_secagg(secagg)
    return privacy.admit(method)
