"""The ``[secagg]`` settings of expert-level secure aggregation (:mod:`hfedmoe.secagg`).

Its own module so that configs load without the cryptography libraries installed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hfedmoe.errors import ConfigError


@dataclass(frozen=True)
class SecAggConfig:
    """Secure aggregation settings (``[secagg]``; off by default).

    Attributes:
        enabled: aggregate through the masked protocol instead of plain updates.
        min_contributors: k, the fewest contributors a unit's sum is revealed for (>= 2).
        dropout_fraction: the share of a client's n - 1 share holders that may drop before
            unmasking; the Shamir threshold is ``t = h - floor(dropout_fraction * h)``. Below 0.5
            so that t is a strict majority of the holders.
        frac_bits: fixed-point fraction bits of the quantization.
        clip: deltas are clipped element-wise to ``[-clip, clip]`` before weighting.
        max_weight: the largest weight a client may use (|D_c|, P(c) or their product).
        max_clients: the most contributors a unit may have; with the bounds above it must keep
            every sum inside the 64-bit ring.
        phase_timeout_s: how long the server waits for a phase's messages after training
            (advertisements are due by the round's deadline); who has not answered by then
            counts as dropped.
        sim_drop_before_input: simulator only: clients per round that drop after sharing keys
            and before sending their masked input (their update is lost).
        sim_drop_before_unmask: simulator only: clients per round that drop after sending their
            masked input and before unmasking (their update still counts).
    """

    enabled: bool = False
    min_contributors: int = 3
    dropout_fraction: float = 0.3
    frac_bits: int = 32
    clip: float = 4.0
    max_weight: float = 131072.0
    max_clients: int = 1024
    phase_timeout_s: float = 60.0
    sim_drop_before_input: int = 0
    sim_drop_before_unmask: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.min_contributors <= 1 << 16:
            raise ConfigError("secagg.min_contributors must be in [2, 65536]")
        if not 0.0 <= self.dropout_fraction < 0.5:
            raise ConfigError("secagg.dropout_fraction must be in [0, 0.5)")
        if not 8 <= self.frac_bits <= 48:
            raise ConfigError("secagg.frac_bits must be in [8, 48]")
        if not (self.clip > 0 and self.max_weight >= 1 and self.max_clients >= 2):
            raise ConfigError("secagg.clip must be > 0, secagg.max_weight >= 1 and "
                              "secagg.max_clients >= 2")
        bits = (math.log2(self.max_clients) + math.log2(self.max_weight)
                + math.log2(max(self.clip, 1.0)) + self.frac_bits)
        if bits > 62:
            raise ConfigError(f"secagg: max_clients * max_weight * clip * 2^frac_bits needs "
                              f"{bits:.1f} bits, more than the 62 a 64-bit sum may use")
        if not self.phase_timeout_s > 0:
            raise ConfigError("secagg.phase_timeout_s must be > 0")
        if self.sim_drop_before_input < 0 or self.sim_drop_before_unmask < 0:
            raise ConfigError("secagg.sim_drop_before_input and sim_drop_before_unmask must "
                              "be >= 0")

    def threshold(self, holders: int) -> int:
        """Shamir threshold t for ``holders`` share holders (at least 1)."""
        return max(1, holders - math.floor(self.dropout_fraction * holders))
