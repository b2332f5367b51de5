"""Bounded updates and robust expert aggregation: pure functions over deltas.

Two defences against a registered device that sends large or sign-flipped deltas, next to the
weighted means of Eq. 17-21 (:mod:`hfedmoe.aggregation`):

- **Norm bounds** on one update, checked on arrival: the L2 norm of the whole update (every
  delta it carries, concatenated) and of each expert's deltas (every key of
  ``layers.l.experts.e.*``). :func:`norm_violations` says which bounds an update passes over,
  :func:`clip_update` scales it into them: each expert's deltas by ``min(1, bound / norm)``
  first, then the whole update by the same rule on what is left.
- **Robust means per key** over the clients that sent the key and qualify for it (the same
  senders Eq. 17 weighs; a missing key still means "not trained here"):

  * ``"trimmed-mean"``: the coordinate-wise trimmed mean, unweighted: per element, drop the
    ``t`` largest and the ``t`` smallest values, average the rest, with
    ``t = min(ceil(trim_fraction * n), (n - 1) // 2)`` for ``n`` contributors
    (:func:`trim_count`; 0 for one or two contributors, so a key sent by one client is not
    protected by trimming);
  * ``"norm-bounded"``: each contributor's delta clipped to the median L2 norm among the
    contributors, then the key's usual weighted mean (Eq. 17 weights for experts). A key
    sent by one client keeps its delta: the median of one norm is that norm.

Neither robust mean protects an expert that only the attacker trained; the per-expert norm
bound does (docs/deployment.md, "Bounded updates").
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence
from typing import Literal

import torch

from hfedmoe.errors import AlgorithmError
from hfedmoe.names import ExpertId, parse_key
from hfedmoe.update import SparseUpdate

Tensor = torch.Tensor
Robust = Literal["none", "trimmed-mean", "norm-bounded"]
ROBUST: tuple[Robust, ...] = ("none", "trimmed-mean", "norm-bounded")


def l2(tensors: Sequence[Tensor]) -> float:
    """The L2 norm of ``tensors`` taken together (0 for none), computed in float64."""
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in tensors))


def expert_norms(update: SparseUpdate) -> dict[ExpertId, float]:
    """Per expert the update carries deltas for, the L2 norm of those deltas together."""
    by_expert: dict[ExpertId, list[Tensor]] = {}
    for key, delta in update.deltas.items():
        expert = parse_key(key).expert
        if expert is not None:
            by_expert.setdefault(expert, []).append(delta)
    return {e: l2(ts) for e, ts in sorted(by_expert.items())}


def update_norm(update: SparseUpdate) -> float:
    """The L2 norm of every delta of the update, concatenated."""
    return l2(list(update.deltas.values()))


def norm_violations(update: SparseUpdate, max_update_norm: float,
                    max_expert_norm: float) -> list[str]:
    """What passes over the bounds (a bound of 0 is off): one line per offending expert and
    one for the whole update, e.g. ``"expert 1:2 norm 41.2 > 5"``; empty when within."""
    out = []
    if max_expert_norm > 0:
        out += [f"expert {e} norm {n:.4g} > {max_expert_norm:g}"
                for e, n in expert_norms(update).items() if n > max_expert_norm]
    if max_update_norm > 0:
        n = update_norm(update)
        if n > max_update_norm:
            out.append(f"update norm {n:.4g} > {max_update_norm:g}")
    return out


def _scale(t: Tensor, factor: float) -> Tensor:
    return t if factor >= 1.0 else (t.detach().double() * factor).to(t.dtype)


def clip_update(update: SparseUpdate, max_update_norm: float,
                max_expert_norm: float) -> SparseUpdate:
    """``update`` with its deltas scaled into the bounds (a bound of 0 is off): each expert's
    deltas by ``min(1, max_expert_norm / norm)``, then all of them by
    ``min(1, max_update_norm / norm)`` of what the first step left. Deltas within the bounds
    are the same tensors; nothing else of the update changes."""
    deltas = dict(update.deltas)
    if max_expert_norm > 0:
        for e, n in expert_norms(update).items():
            if n > max_expert_norm:
                for key in [k for k in deltas if parse_key(k).expert == e]:
                    deltas[key] = _scale(deltas[key], max_expert_norm / n)
    if max_update_norm > 0:
        n = l2(list(deltas.values()))
        if n > max_update_norm:
            deltas = {k: _scale(d, max_update_norm / n) for k, d in deltas.items()}
    return dataclasses.replace(update, deltas=deltas)


def trim_count(n: int, fraction: float) -> int:
    """Values dropped at each end of ``n``: ``min(ceil(fraction * n), (n - 1) // 2)``, so at
    least one value is always kept (0 for ``n <= 2`` or ``fraction == 0``)."""
    if n < 1 or not 0.0 <= fraction < 0.5:
        raise AlgorithmError(f"trim_count: need n >= 1 and fraction in [0, 0.5), got {n}, "
                             f"{fraction}")
    return min(math.ceil(fraction * n - 1e-12), (n - 1) // 2)


def trimmed_mean(deltas: Sequence[Tensor], trim: int) -> Tensor:
    """The coordinate-wise mean of ``deltas`` after dropping, per element, the ``trim``
    largest and ``trim`` smallest values. Computed in float64 for float64 input, float32
    otherwise.

    Raises:
        AlgorithmError: no deltas, differing shapes, or ``2 * trim >= len(deltas)``.
    """
    n = len(deltas)
    if n == 0 or trim < 0 or 2 * trim >= n:
        raise AlgorithmError(f"trimmed_mean: cannot drop 2 x {trim} of {n} values")
    dtype = torch.float64 if deltas[0].dtype == torch.float64 else torch.float32
    if any(d.shape != deltas[0].shape for d in deltas):
        raise AlgorithmError("trimmed_mean: deltas differ in shape")
    stacked = torch.stack([d.detach().to(dtype) for d in deltas])  # (n, *param_shape)
    if trim:
        stacked = stacked.sort(dim=0).values[trim:n - trim]  # (n - 2 trim, *param_shape)
    return stacked.mean(dim=0)


def norm_bounded_mean(deltas: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``sum_c w_c clip(delta_c)`` with each delta clipped to the median L2 norm among
    ``deltas``; ``weights`` must sum to 1 (the key's normalised Eq. 17-21 weights).

    Raises:
        AlgorithmError: no deltas, or deltas and weights of different lengths.
    """
    if not deltas or len(deltas) != len(weights):
        raise AlgorithmError(f"norm_bounded_mean: {len(deltas)} deltas, {len(weights)} weights")
    dtype = torch.float64 if deltas[0].dtype == torch.float64 else torch.float32
    norms = [l2([d]) for d in deltas]
    bound = statistics.median(norms)
    acc = torch.zeros(deltas[0].shape, dtype=dtype)  # (*param_shape)
    for d, n, w in zip(deltas, norms, weights, strict=True):
        factor = 1.0 if n <= bound or n == 0 else bound / n
        acc += (w * factor) * d.detach().to(dtype=dtype, device=acc.device)
    return acc


def robust_mean(robust: Robust, deltas: Sequence[Tensor], weights: Sequence[float],
                trim_fraction: float) -> Tensor:
    """One key's aggregated delta by ``robust`` (see the module docstring); ``"none"`` is the
    weighted mean ``sum_c w_c delta_c`` of Eq. 17-21."""
    if robust == "trimmed-mean":
        return trimmed_mean(deltas, trim_count(len(deltas), trim_fraction))
    if robust == "norm-bounded":
        return norm_bounded_mean(deltas, weights)
    if robust != "none":
        raise AlgorithmError(f"unknown robust aggregation {robust!r}; one of {ROBUST}")
    dtype = torch.float64 if deltas[0].dtype == torch.float64 else torch.float32
    acc = torch.zeros(deltas[0].shape, dtype=dtype)  # (*param_shape)
    for d, w in zip(deltas, weights, strict=True):
        acc += w * d.detach().to(dtype=dtype, device=acc.device)
    return acc


def check_robust(robust: str, trim_fraction: float) -> None:
    """Raise :class:`AlgorithmError` for an unknown option or a trim fraction outside [0, 0.5)."""
    if robust not in ROBUST:
        raise AlgorithmError(f"unknown robust aggregation {robust!r}; one of {ROBUST}")
    if not 0.0 <= trim_fraction < 0.5:
        raise AlgorithmError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")


__all__ = ["ROBUST", "Robust", "check_robust", "clip_update", "expert_norms", "l2",
           "norm_bounded_mean", "norm_violations", "robust_mean", "trim_count", "trimmed_mean",
           "update_norm"]

