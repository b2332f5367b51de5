"""Frozen weights stored in bf16/fp16 for a round, restored bit-exactly after it.

Used when ``train.hold_frozen_lowp`` is set (off by default: on the CPU measured it made a bf16
step no faster, ``benchmarks/precision.py``).

Under ``torch.autocast`` every matmul casts its fp32 weight to the autocast dtype on every call,
and autograd keeps the cast copy for the backward: for a frozen weight that is a cast and a
copy per use, per step, for a value that does not change during the round (on a CPU the casts
were the largest single cost of a bf16 step in one profile).
:class:`LowPrecisionFrozen` instead stores each frozen 2-D matmul weight in the low-precision
dtype once for the round; autocast then finds it already in its dtype and casts nothing.

No memory is added: a weight's fp32 bits are split into its bf16 value (rounded to nearest,
ties away from zero) and the 16 low bits that bf16 drops, kept as int16, so the two halves
take the fp32 tensor's bytes and :meth:`LowPrecisionFrozen.restore` rebuilds the fp32 value
bit for bit. fp16 is not a bit split of fp32, so for fp16 the fp32 original is kept aside
(the fp16 copy is extra memory).

Left in fp32: trainable parameters (the optimizer keeps fp32 masters), embedding tables
(lookups, not matmuls; a lowered table would change every token's input), 1-D parameters
(norms, biases: elementwise ops that autocast runs in fp32), quantized weights (their own
kernels, ``model.quantize``) and any tensor shared with one of these. A weight that becomes
trainable inside the round must be restored first (:meth:`restore` with ``only``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from hfedmoe.errors import ModelError

LOW_PRECISION = (torch.bfloat16, torch.float16)


def _split_bf16(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 -> (bf16 value, int16 low bits) with ``hi << 16 + lo == bits`` exactly."""
    bits = w.detach().contiguous().view(torch.int32)
    hi = (bits + 0x8000) >> 16  # round half away from zero on the magnitude bits
    lo = (bits - (hi << 16)).to(torch.int16)  # in [-32768, 32767]
    return hi.to(torch.int16).view(torch.bfloat16), lo


def _join_bf16(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    bits = (hi.view(torch.int16).to(torch.int32) << 16) + lo.to(torch.int32)
    return bits.view(torch.float32)


def lowerable(module: nn.Module) -> list[nn.Parameter]:
    """The frozen fp32 2-D matmul weights of ``module`` (see the module docstring)."""
    keep: set[int] = set()
    for sub in module.modules():
        if isinstance(sub, nn.Embedding | nn.EmbeddingBag):
            keep.update(id(p) for p in sub.parameters(recurse=False))
    out, seen = [], set()
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if (id(p) in keep or p.requires_grad or p.dim() != 2 or p.dtype != torch.float32
                or type(p.data) is not torch.Tensor):
            continue
        out.append(p)
    return out


class LowPrecisionFrozen:
    """Stores ``module``'s frozen matmul weights in ``dtype`` until :meth:`restore`.

    Use as a context manager around a round's low-precision work (routing pass and steps);
    the module's fp32 weights are back, unchanged to the bit, when it exits.
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        if dtype not in LOW_PRECISION:
            raise ModelError(f"frozen weights can be stored in bf16 or fp16, not {dtype}")
        self.module, self.dtype = module, dtype
        # parameter -> what restores it: (bf16 hi, int16 lo) or the fp32 original (fp16)
        self._held: dict[nn.Parameter, tuple[torch.Tensor, ...]] = {}
        self.lowered_total = 0  # weights lowered since this was made (restored ones included)

    def lower(self) -> int:
        """Store every lowerable weight in ``dtype``; returns how many were lowered."""
        n = 0
        with torch.no_grad():
            for p in lowerable(self.module):
                if self.dtype == torch.bfloat16:
                    hi, lo = _split_bf16(p.data)
                    self._held[p] = (lo,)
                    p.data = hi
                else:
                    self._held[p] = (p.data,)
                    p.data = p.data.to(self.dtype)
                n += 1
        self.lowered_total += n
        return n

    def restore(self, only: Iterable[torch.Tensor] | None = None) -> int:
        """Put the fp32 values back (of ``only`` if given); returns how many were restored."""
        wanted = None if only is None else {id(t) for t in only}
        n = 0
        with torch.no_grad():
            for p in list(self._held):
                if wanted is not None and id(p) not in wanted:
                    continue
                held = self._held.pop(p)
                p.data = (_join_bf16(p.data, held[0]) if self.dtype == torch.bfloat16
                          else held[0])
                n += 1
        return n

    @property
    def lowered(self) -> int:
        return len(self._held)

    def __enter__(self) -> LowPrecisionFrozen:
        self.lower()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()
