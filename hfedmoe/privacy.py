"""Optional client-side differential privacy on an update's deltas (DP-FedAvg style).

Off by default (``method.dp_clip = 0``). When on, the client, before sending:

1. clips the L2 norm of the *whole* update -- every delta it sends (experts, gates, shared),
   concatenated -- to ``dp_clip``: ``delta *= min(1, dp_clip / ||delta||)``. Clipping the whole
   update (not per expert) bounds the sensitivity of everything that leaves the device with a
   single norm, as in DP-FedAvg; per-expert clipping would let the bound grow with the number of
   experts sent.
2. adds Gaussian noise ``N(0, (dp_noise_multiplier * dp_clip)^2)`` to every sent element, drawn
   from the operating system's cryptographic randomness (``os.urandom``), so nobody who knows
   the run's settings -- the server included -- can regenerate and subtract it. Reproducible
   noise exists only for tests: a caller may pass a seeded generator explicitly; the kit's
   training path never does.

Neither the pre-clip norm nor the clipping factor leaves the device (both would reveal the
update's norm). Only keys that are sent get noise: which experts were updated is not hidden.

**Threat model.** The mechanism protects a device's local data against whoever sees its
updates -- the server, the broker, anyone on the path -- as far as the settings it runs with
go. The server announces them; a device applies the stricter of those and its own
(:mod:`device_agent.privacy`), so a server that announces no noise gets none only from a
device with no floor of its own. Protection is at the level of the device's whole
dataset (an update and the same device's update without its data differ by at most
``dp_clip`` in L2 after clipping): every round a device takes part in is one Gaussian
mechanism with noise multiplier ``z = dp_noise_multiplier`` and sensitivity ``dp_clip``.
:func:`epsilon_of_rounds` composes the rounds as they ran (each at its own noise) with the
RDP accountant of ``dp-accounting`` (no amplification by sampling: the server knows who took
part) into (epsilon, delta)-DP; :func:`epsilon` is the same for rounds at one noise.
It does not hide participation, the set of updated experts or the number of examples; usage,
importance and the loss travel as the device's metadata settings say.
"""

from __future__ import annotations

import functools
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from hfedmoe.config import MethodConfig
from hfedmoe.errors import AlgorithmError, ConfigError

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


def os_gaussian(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal samples from ``os.urandom`` (Box-Muller on 53-bit uniforms in (0, 1]),
    never from a seeded generator."""
    n = math.prod(shape)
    pairs = (n + 1) // 2
    raw = torch.frombuffer(bytearray(os.urandom(16 * pairs)), dtype=torch.int64)
    u = (((raw >> 11) & (2**53 - 1)).to(torch.float64) + 1.0) * 2.0**-53  # uniform in (0, 1]
    u1, u2 = u[:pairs], u[pairs:]
    r = torch.sqrt(-2.0 * torch.log(u1))
    z = torch.cat([r * torch.cos(2 * math.pi * u2), r * torch.sin(2 * math.pi * u2)])
    return z[:n].reshape(shape).to(dtype)


def privatize(deltas: Mapping[str, Tensor], clip: float, noise_multiplier: float,
              generator: torch.Generator | None = None) -> PrivatizedDeltas:
    """Clip the whole update to L2 norm ``clip``, then add Gaussian noise of std
    ``noise_multiplier * clip`` (DP-FedAvg's Gaussian mechanism).

    Args:
        deltas: canonical key -> delta tensor.
        clip: L2 clipping bound; 0 turns the mechanism off (deltas returned unchanged).
        noise_multiplier: noise std in units of ``clip``.
        generator: tests only: a seeded CPU generator makes the noise reproducible. None (the
            kit's training path): noise from the OS's cryptographic randomness.

    Returns:
        The :class:`PrivatizedDeltas`.

    Raises:
        AlgorithmError: negative parameters, noise without a clip bound, or non-finite deltas.
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
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    std = noise_multiplier * clip
    out: dict[str, Tensor] = {}
    for key in sorted(deltas):
        d = deltas[key].detach()
        work = d.to(torch.float64 if d.dtype == torch.float64 else torch.float32) * scale
        if std > 0:
            noise = (torch.randn(work.shape, generator=generator, dtype=work.dtype)
                     if generator is not None else os_gaussian(tuple(work.shape), work.dtype))
            work = work + std * noise.to(work.device)
        out[key] = work.to(d.dtype)
    return PrivatizedDeltas(out, norm, scale, std)


def privatize_with_config(deltas: Mapping[str, Tensor], cfg: MethodConfig,
                          generator: torch.Generator | None = None) -> PrivatizedDeltas:
    """:func:`privatize` with ``cfg.dp_clip`` and ``cfg.dp_noise_multiplier``."""
    return privatize(deltas, cfg.dp_clip, cfg.dp_noise_multiplier, generator)


def epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Epsilon a device has spent after ``rounds`` noised updates at ``delta`` (the RDP
    accountant of Google's ``dp-accounting``; each update a Gaussian mechanism of noise multiplier ``noise_multiplier`` with
    no sampling amplification). 0 for no rounds; inf without noise.

    Raises:
        AlgorithmError: ``delta`` outside (0, 1) or negative arguments.
    """
    if not 0 < delta < 1 or rounds < 0 or noise_multiplier < 0:
        raise AlgorithmError("epsilon needs 0 < delta < 1, rounds >= 0, noise_multiplier >= 0")
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    return _rdp_epsilon(float(noise_multiplier), int(rounds), float(delta))


@functools.lru_cache(maxsize=1024)
def _rdp_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    dp_accounting = _dp_accounting()
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier), count=rounds)
    return float(accountant.get_epsilon(delta))


def epsilon_of_rounds(rounds: Sequence[tuple[float, float]], delta: float) -> float:
    """Epsilon at ``delta`` of a sequence of noised updates, each ``(noise_multiplier,
    sampling_probability)`` as it actually ran (the RDP accountant of ``dp-accounting``): a
    Gaussian mechanism per round, amplified by Poisson sampling where the probability is below
    1. 0 for no rounds; inf when any round had no noise.

    Raises:
        AlgorithmError: ``delta`` outside (0, 1), a negative noise or a probability outside
            (0, 1].
    """
    if not 0 < delta < 1:
        raise AlgorithmError(f"epsilon needs 0 < delta < 1, got {delta}")
    if any(z < 0 or not 0 < q <= 1 for z, q in rounds):
        raise AlgorithmError("each round needs noise_multiplier >= 0 and 0 < sampling <= 1")
    if not rounds:
        return 0.0
    if any(z == 0 for z, _ in rounds):
        return math.inf
    dp_accounting = _dp_accounting()
    accountant = dp_accounting.rdp.RdpAccountant()
    for (z, q), count in sorted(Counter((float(z), float(q)) for z, q in rounds).items()):
        event = dp_accounting.GaussianDpEvent(z)
        if q < 1:
            event = dp_accounting.PoissonSampledDpEvent(q, event)
        accountant.compose(event, count=count)
    return float(accountant.get_epsilon(delta))


def _dp_accounting():
    try:
        import dp_accounting
    except ImportError as exc:  # a phone that could not build dm-tree (docs/field-trials.md)
        raise ConfigError("DP noise needs epsilon accounting, which needs dp-accounting "
                          "(pip install dp-accounting); or turn the noise off") from exc
    return dp_accounting


def rounds_within(noise_multiplier: float, max_epsilon: float, delta: float,
                  limit: int = 100_000) -> int:
    """The most noised rounds a device can take part in without epsilon passing
    ``max_epsilon`` (``limit`` when the budget never binds within it)."""
    if max_epsilon <= 0 or noise_multiplier <= 0:
        return 0
    lo, hi = 0, 1
    while hi < limit and epsilon(noise_multiplier, hi, delta) <= max_epsilon:
        lo, hi = hi, hi * 2
    hi = min(hi, limit)
    if epsilon(noise_multiplier, hi, delta) <= max_epsilon:
        return hi
    while hi - lo > 1:  # epsilon(lo) <= max < epsilon(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if epsilon(noise_multiplier, mid, delta) <= max_epsilon else (lo, mid)
    return lo


def may_take_part(noised_rounds: int | Sequence[float], cfg: MethodConfig) -> bool:
    """Whether one more noised update at ``cfg``'s noise keeps a device within
    ``cfg.dp_max_epsilon``. ``noised_rounds`` is either a count of earlier updates at ``cfg``'s
    noise or the noise multiplier each earlier update ran at, each accounted at its own."""
    if cfg.dp_max_epsilon <= 0 or cfg.dp_noise_multiplier <= 0:
        return True
    if isinstance(noised_rounds, int):
        return (epsilon(cfg.dp_noise_multiplier, noised_rounds + 1, cfg.dp_delta)
                <= cfg.dp_max_epsilon)
    rounds = [(float(z), 1.0) for z in noised_rounds] + [(cfg.dp_noise_multiplier, 1.0)]
    return epsilon_of_rounds(rounds, cfg.dp_delta) <= cfg.dp_max_epsilon


def privacy_report(noised_rounds: Mapping[str, int | Sequence[float]],
                   cfg: MethodConfig) -> dict | None:
    """Per device, the epsilon its noised updates have spent at ``cfg.dp_delta``: what the
    server's metrics and report show after every round.

    ``noised_rounds`` gives per device either a count of updates at ``cfg``'s noise, or the
    noise multiplier each of its updates reported it ran at (a device may add more noise than
    the round asked for: device_agent.privacy), each accounted at its own. None when nothing
    was noised.
    """
    lists = {d: ([float(cfg.dp_noise_multiplier)] * n if isinstance(n, int) else
                 [float(z) for z in n]) for d, n in sorted(noised_rounds.items())}
    lists = {d: zs for d, zs in lists.items() if zs and all(z > 0 for z in zs)}
    if cfg.dp_noise_multiplier <= 0 and not lists:
        return None
    eps = {d: round(epsilon_of_rounds([(z, 1.0) for z in zs], cfg.dp_delta), 4)
           for d, zs in lists.items()}
    return {"delta": cfg.dp_delta, "noise_multiplier": cfg.dp_noise_multiplier,
            "clip": cfg.dp_clip, "max_epsilon": cfg.dp_max_epsilon or None,
            "rounds": {d: len(zs) for d, zs in lists.items()}, "epsilon": eps,
            "epsilon_max": max(eps.values(), default=0.0)}
