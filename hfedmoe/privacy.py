"""Optional client-side differential privacy on an update's deltas (DP-FedAvg style).

Off by default (``method.dp_clip = 0``). When on, the client, before sending:

1. clips the L2 norm of the *whole* update -- every delta it sends (experts, gates, shared),
   concatenated -- to ``dp_clip``: ``delta *= min(1, dp_clip / ||delta||)``. Clipping the whole
   update (not per expert) bounds the sensitivity of everything that leaves the device with a
   single norm, as in DP-FedAvg; per-expert clipping would let the bound grow with the number of
   experts sent.
2. adds Gaussian noise ``N(0, (dp_noise_multiplier * dp_clip)^2)`` to every sent element, drawn
   from a seeded CPU generator in sorted key order, so a run reproduces exactly.

Only keys that are sent get noise: the sparsity pattern (which experts were updated) is not
hidden. Accounting of the privacy budget across rounds is left to the caller.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from hfedmoe.config import MethodConfig
from hfedmoe.errors import AlgorithmError

Tensor = torch.Tensor


@dataclass(frozen=True)
class PrivatizedDeltas:
    """Deltas after clipping and noise, with what was done (for logging).

    Attributes:
        deltas: canonical key -> privatized delta (same dtype and device as the input).
        norm: L2 norm of the whole update before clipping.
        scale: the clipping factor applied, ``min(1, clip / norm)``.
        noise_std: standard deviation of the added noise.
    """

    deltas: Mapping[str, Tensor]
    norm: float
    scale: float
    noise_std: float


def update_norm(deltas: Mapping[str, Tensor]) -> float:
    """L2 norm of all deltas concatenated."""
    sq = sum(float(d.detach().double().pow(2).sum()) for d in deltas.values())
    return math.sqrt(sq)


def privatize(deltas: Mapping[str, Tensor], clip: float, noise_multiplier: float,
              generator: torch.Generator | None = None) -> PrivatizedDeltas:
    """Clip the whole update to L2 norm ``clip``, then add Gaussian noise of std
    ``noise_multiplier * clip`` (DP-FedAvg's Gaussian mechanism).

    Args:
        deltas: canonical key -> delta tensor.
        clip: L2 clipping bound; 0 turns the mechanism off (deltas returned unchanged).
        noise_multiplier: noise std in units of ``clip``.
        generator: a CPU generator; required when ``noise_multiplier > 0``.

    Returns:
        The :class:`PrivatizedDeltas`.

    Raises:
        AlgorithmError: negative parameters, noise without a clip bound or without a generator,
            or non-finite deltas.
    """
    if clip < 0 or noise_multiplier < 0:
        raise AlgorithmError("clip and noise_multiplier must be >= 0")
    norm = update_norm(deltas)
    if not math.isfinite(norm):
        raise AlgorithmError("update holds non-finite values; cannot clip")
    if clip == 0:
        if noise_multiplier > 0:
            raise AlgorithmError("noise needs clip > 0 (noise is scaled by the clip bound)")
        return PrivatizedDeltas(dict(deltas), norm, 1.0, 0.0)
    if noise_multiplier > 0 and generator is None:
        raise AlgorithmError("a seeded generator is required to add noise")
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    std = noise_multiplier * clip
    out: dict[str, Tensor] = {}
    for key in sorted(deltas):
        d = deltas[key].detach()
        work = d.to(torch.float64 if d.dtype == torch.float64 else torch.float32) * scale
        if std > 0:
            noise = torch.randn(work.shape, generator=generator, dtype=work.dtype)  # (*shape)
            work = work + std * noise.to(work.device)
        out[key] = work.to(d.dtype)
    return PrivatizedDeltas(out, norm, scale, std)


def privatize_with_config(deltas: Mapping[str, Tensor], cfg: MethodConfig,
                          generator: torch.Generator | None = None) -> PrivatizedDeltas:
    """:func:`privatize` with ``cfg.dp_clip`` and ``cfg.dp_noise_multiplier``."""
    return privatize(deltas, cfg.dp_clip, cfg.dp_noise_multiplier, generator)
