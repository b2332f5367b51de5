"""Poisoning devices for the simulator: a registered device that sends scaled or sign-flipped
deltas (benchmarks/poisoning.py).

An :class:`Attack` is applied to a device's update after local training and before it is
encoded (:func:`lab.devices.train_device`), so the server's side (decode, the policy's bounds,
aggregation) sees it exactly as it would see a hostile device's upload. Only the simulator
uses it: the device agent's production path has no such hook.

    scale:F       every delta x F (F = 10: a "boosted" update)
    sign-flip:F   every delta x -F (gradient ascent, boosted)

The update's other fields (experts, usage, importance, ``num_examples``) stay as trained, so
the attack passes every check a budget or the weighting policy makes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Literal

from hfedmoe.errors import ConfigError
from hfedmoe.update import SparseUpdate

AttackKind = Literal["scale", "sign-flip"]
KINDS: tuple[AttackKind, ...] = ("scale", "sign-flip")


@dataclasses.dataclass(frozen=True)
class Attack:
    """Which devices poison their updates, and how.

    Attributes:
        kind: ``"scale"`` (delta x factor) or ``"sign-flip"`` (delta x -factor).
        factor: the scale, finite and > 0.
        devices: the indices of the poisoning devices (their data shard and seed index).
    """

    kind: AttackKind
    factor: float
    devices: frozenset[int]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"attack kind must be one of {KINDS}, got {self.kind!r}")
        if not math.isfinite(self.factor) or self.factor <= 0:
            raise ConfigError(f"attack factor must be a finite number > 0, got {self.factor}")
        if not self.devices or min(self.devices) < 0:
            raise ConfigError(f"an attack needs device indices >= 0, got {sorted(self.devices)}")

    @property
    def multiplier(self) -> float:
        """What every delta is multiplied by."""
        return -self.factor if self.kind == "sign-flip" else self.factor

    @property
    def label(self) -> str:
        """``"scale:10"``, ``"sign-flip:10"``: how the benchmark names it."""
        return f"{self.kind}:{self.factor:g}"

    def hits(self, index: int) -> bool:
        """True when device ``index`` poisons its update."""
        return index in self.devices

    def apply(self, update: SparseUpdate) -> SparseUpdate:
        """``update`` with every delta multiplied (in its own dtype)."""
        m = self.multiplier
        return dataclasses.replace(update, deltas={k: d * m for k, d in update.deltas.items()})


def parse_attack(spec: str, devices: Iterable[int]) -> Attack:
    """``"scale:10"`` or ``"sign-flip:10"`` (``"sign-flip"``: factor 1) for ``devices``.

    Raises:
        ConfigError: an unknown kind or a factor that is not a number > 0.
    """
    kind, _, factor = spec.strip().partition(":")
    try:
        value = float(factor) if factor else 1.0
    except ValueError:
        raise ConfigError(f"attack {spec!r}: the factor {factor!r} is not a number") from None
    if kind not in KINDS:
        raise ConfigError(f"attack {spec!r}: kind must be one of {', '.join(KINDS)}")
    return Attack(kind, value, frozenset(devices))  # type: ignore[arg-type]
