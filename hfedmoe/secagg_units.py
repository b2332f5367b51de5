"""What a client contributes to secure aggregation, unit by unit, and the ring arithmetic.

A *unit* is what gets one contributor group and one self-mask seed: every key of one expert
(``"e:{layer}:{expert}"``), or one gate or shared key (``"k:{key}"``). Weights are the ones of
:mod:`hfedmoe.aggregation`, computed by the client so that sums suffice:

- expert e (Eq. 17): ``w_c = |D_c| * 1[u_c(e) >= tau]`` (``"usage-threshold"``) or ``|D_c|``;
  a client with ``w_c = 0`` for e does not contribute e at all;
- gate key (Eq. 20-21): ``w_c = P(c)`` (``"importance"``) or ``P(c) |D_c|``
  (``"importance-size"``), with the data-size fallback ``|D_c|`` carried beside it, used only
  when the revealed ``sum P`` is 0; or ``|D_c|`` (``"data-size"``);
- shared key: ``|D_c|``.

A unit's vector is ``q(w x) || q(w)`` (and ``|| q(fb x) || q(fb)`` with a fallback), ``x`` the
unit's deltas flattened in sorted key order and clipped; the revealed mean is
``sum(w x) / sum(w)``, which is exactly the per-key normalised weighting of
:func:`hfedmoe.aggregation.aggregate` up to quantization.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hfedmoe.aggregation import AggregationRule, raw_weight, summarize
from hfedmoe.errors import AlgorithmError, SecAggError
from hfedmoe.names import parse_key
from hfedmoe.secagg import SecAggConfig, dequantize, prg, quantize, unit_of
from hfedmoe.update import SparseUpdate

Shapes = Mapping[str, Sequence[int]]


def has_fallback(unit: str, rule: AggregationRule) -> bool:
    """Whether a unit carries the data-size fallback beside its primary weight (gate keys
    under an importance weighting)."""
    return (unit.startswith("k:") and parse_key(unit[2:]).kind == "gate"
            and rule.gate_weighting in ("importance", "importance-size"))


@dataclass(frozen=True)
class Contribution:
    """One client's part of one unit: its keys and its (unnormalised) weights."""

    unit: str
    keys: tuple[str, ...]
    weight: float
    fallback: float | None  # data-size fallback weight (gate keys under importance weighting)


def contributions(update: SparseUpdate, rule: AggregationRule,
                  cfg: SecAggConfig) -> dict[str, Contribution]:
    """The units ``update`` contributes to and its weights, as plain aggregation would weigh it.

    Raises:
        AlgorithmError: an inconsistent update, or a weight above ``cfg.max_weight``.
    """
    summary = summarize(update, rule.tau)
    by_unit: dict[str, list[str]] = {}
    for key in update.deltas:
        by_unit.setdefault(unit_of(key), []).append(key)
    out: dict[str, Contribution] = {}
    for unit, keys in sorted(by_unit.items()):
        w, fb = raw_weight(summary, parse_key(keys[0]), rule)
        if not has_fallback(unit, rule):
            fb = None
        if w <= 0 and not fb:
            continue  # does not qualify (Eq. 17): not a contributor
        if max(w, fb or 0.0) > cfg.max_weight:
            raise AlgorithmError(f"{update.client_id}: weight {max(w, fb or 0.0):g} of {unit} "
                                 f"is above secagg.max_weight = {cfg.max_weight:g}")
        out[unit] = Contribution(unit, tuple(sorted(keys)), float(w), fb)
    return out


def numel(keys: Sequence[str], shapes: Shapes) -> int:
    """Elements of a unit's deltas."""
    return sum(int(np.prod(shapes[k], dtype=np.int64)) for k in keys)


def vector_length(keys: Sequence[str], shapes: Shapes, fallback: bool) -> int:
    """Words of a unit's vector: deltas and weight, twice with a fallback."""
    return (numel(keys, shapes) + 1) * (2 if fallback else 1)


def encode(deltas: Mapping[str, torch.Tensor], c: Contribution, cfg: SecAggConfig) -> np.ndarray:
    """The unit's unmasked vector ``q(w clip(x)) || q(w) [|| q(fb clip(x)) || q(fb)]``.

    Raises:
        AlgorithmError: a delta holds NaN or Inf.
    """
    x = np.concatenate([deltas[k].detach().to("cpu", torch.float64).reshape(-1).numpy()
                        for k in c.keys])  # (numel,)
    if not np.isfinite(x).all():
        raise AlgorithmError(f"{c.unit}: a delta holds NaN or Inf (it would corrupt the sum)")
    x = np.clip(x, -cfg.clip, cfg.clip)
    parts = [x * c.weight, [c.weight]]
    if c.fallback is not None:
        parts += [x * c.fallback, [c.fallback]]
    return quantize(np.concatenate(parts), cfg.frac_bits)


def _label(round_key: bytes, unit: str) -> bytes:
    return round_key + b"/" + unit.encode()


def mask(vec: np.ndarray, unit: str, round_key: bytes, self_seed: bytes, me: str,
         pair_seeds: Mapping[str, bytes]) -> np.ndarray:
    """``vec + PRG(b) + sum_v sign(me, v) PRG(s_me,v)`` in Z_(2^64) (sign + when me < v)."""
    label = _label(round_key, unit)
    out = vec + prg(self_seed, label, len(vec))
    for peer, seed in sorted(pair_seeds.items()):
        m = prg(seed, label, len(vec))
        out = out + m if me < peer else out - m
    return out


def unmask(total: np.ndarray, unit: str, round_key: bytes, self_seeds: Sequence[bytes],
           dropped_pairs: Sequence[tuple[str, str, bytes]]) -> np.ndarray:
    """Remove the survivors' self masks and the masks survivors share with dropped clients
    (``(survivor, dropped, seed)``) from the sum of the survivors' vectors."""
    label = _label(round_key, unit)
    out = total.copy()
    for seed in self_seeds:
        out = out - prg(seed, label, len(out))
    for survivor, dropped, seed in dropped_pairs:
        m = prg(seed, label, len(out))
        out = out - m if survivor < dropped else out + m
    return out


def decode_mean(total: np.ndarray, keys: Sequence[str], shapes: Shapes, fallback: bool,
                cfg: SecAggConfig) -> dict[str, torch.Tensor] | None:
    """The weighted mean delta per key from an unmasked sum (float64), or None when no
    contributor has weight (primary and fallback sums both 0).

    Raises:
        SecAggError: a vector of the wrong length.
    """
    d = numel(keys, shapes)
    if len(total) != vector_length(keys, shapes, fallback):
        raise SecAggError(f"unmasked sum has {len(total)} words, want "
                          f"{vector_length(keys, shapes, fallback)}")
    vals = dequantize(total, cfg.frac_bits)
    if vals[d] > 0:
        flat = vals[:d] / vals[d]
    elif fallback and vals[2 * d + 1] > 0:
        flat = vals[d + 1:2 * d + 1] / vals[2 * d + 1]
    else:
        return None
    out, at = {}, 0
    for k in keys:
        n = int(np.prod(shapes[k], dtype=np.int64))
        out[k] = torch.from_numpy(flat[at:at + n].copy()).reshape(tuple(shapes[k]))
        at += n
    return out
