"""Expert compute: one eager reference and registered fast paths.

An :class:`ExpertBank` holds the experts of one MoE layer as separate per-expert parameters
(converted from transformers 5's fused 3-D tensors where needed). Per-expert parameters are what
make the budget real: an expert outside E_active has ``requires_grad=False``, so autograd computes
no weight gradient for it and the optimizer keeps no state for it (METHOD.md section 3).

Paths (``ExpertBank.impl``), all with the same semantics, tested against ``"eager"``:

- ``eager``    loop over routed experts: gather tokens, MLP, scale, scatter-add (the reference).
- ``grouped``  sort token-expert pairs by expert, one ``F.grouped_mm`` for the trained experts and
               one for the frozen ones (so frozen experts never build weight gradients). The
               experts' weights are stacked on every call; under autocast the grouped GEMMs run
               in the autocast dtype (autocast itself leaves ``grouped_mm`` in fp32 on CPU).
- ``sorted``   sort token-expert pairs by expert once, run each expert's ``F.linear`` pair on its
               contiguous block of rows (no weight copies, bias fused, autocast as usual), and
               combine the k outputs of every token by a gather and a weighted sum instead of
               scatter-adds. The fastest path for training on CPU (``benchmarks/kernels.py``).
- ``dense``    every expert on every token, combined with a (tokens, experts) weight matrix;
               static shapes only, for ExecuTorch/ONNX export and tiny models.
- ``capacity`` static shapes with a fixed number of rows per expert (GShard/Switch capacity):
               each expert takes at most ``cap = min(T, ceil(capacity_factor * T * k / E))``
               of its token-expert pairs, first come first served in flat slot order, and runs
               on a (cap, d) block padded with zero rows; the pairs over capacity are dropped
               (no output, no gradient, the other routing weights are not renormalised). The
               expert work is about ``capacity_factor * k / E`` of ``dense``. Exactly the
               ``eager`` path on an index whose dropped pairs carry an out-of-range id; with
               ``capacity_factor >= E / k`` nothing is dropped. For ExecuTorch training
               programs (``export.programs``). The last call's dropped and routed pair counts
               are kept on the bank (:attr:`ExpertBank.dropped_pairs`, ``routed_pairs``).

``detach_frozen=True`` runs frozen experts without autograd: their output is a constant for
backprop, so they save no activations and pass no gradient to their input (an approximation of
the exact gradient; ``benchmarks`` measure its accuracy cost).

A base weight stored quantized (``model.quantize``, :mod:`hfedmoe.quantize`) is frozen: the
``eager``, ``sorted`` and ``dense`` paths run it through torchao's kernel
(:func:`~hfedmoe.quantize.frozen_linear`, input gradient only); ``grouped`` dequantizes the
weights it stacks (:meth:`Expert.weights`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from hfedmoe.errors import ModelError
from hfedmoe.quantize import frozen_linear, plain_weight

if TYPE_CHECKING:
    from hfedmoe.lora import ExpertFactors


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU written as x * sigmoid(x): same values, and its backward exports to ExecuTorch."""
    return x * torch.sigmoid(x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": silu,
    "swish": silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


@dataclass(frozen=True)
class ExpertShape:
    """The MLP every expert of a layer shares.

    ``gated``: SwiGLU-style, ``w_in`` is (2*d_ff, d_model) holding [gate; up] (transformers'
    ``gate_up_proj`` layout); otherwise ``w_in`` is (d_ff, d_model).
    """

    d_model: int
    d_ff: int
    activation: str = "silu"
    gated: bool = True
    bias: bool = False

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ModelError(f"unsupported expert activation {self.activation!r}; "
                             f"known: {sorted(ACTIVATIONS)}")

    @property
    def params_per_expert(self) -> int:
        d_in = self.d_ff * (2 if self.gated else 1)
        n = d_in * self.d_model + self.d_model * self.d_ff
        return n + (d_in + self.d_model if self.bias else 0)

    def flops_per_token(self) -> int:
        """Forward multiply-adds x2 of one expert on one token."""
        d_in = self.d_ff * (2 if self.gated else 1)
        return 2 * (d_in * self.d_model + self.d_model * self.d_ff)


class Expert(nn.Module):
    """One expert MLP with parameters ``w_in``, ``w_out`` (and ``b_in``, ``b_out``)."""

    def __init__(self, shape: ExpertShape) -> None:
        super().__init__()
        self.shape = shape
        d_in = shape.d_ff * (2 if shape.gated else 1)
        self.w_in = nn.Parameter(torch.empty(d_in, shape.d_model))
        self.w_out = nn.Parameter(torch.empty(shape.d_model, shape.d_ff))
        if shape.bias:
            self.b_in = nn.Parameter(torch.zeros(d_in))
            self.b_out = nn.Parameter(torch.zeros(shape.d_model))
        else:
            self.register_parameter("b_in", None)
            self.register_parameter("b_out", None)
        nn.init.normal_(self.w_in, std=0.02)
        nn.init.normal_(self.w_out, std=0.02)
        # LoRA factors while a round fine-tunes this expert with train.adapter = "lora"
        # (hfedmoe.lora.ExpertFactors); None: the plain expert
        self.factors: ExpertFactors | None = None

    @property
    def trainable(self) -> bool:
        return self.w_in.requires_grad or self.factors is not None

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w_in, w_out)`` as the forward sees them (with any LoRA factors merged in; a
        quantized base weight dequantized, ``model.quantize``)."""
        w_in, w_out = plain_weight(self.w_in), plain_weight(self.w_out)
        if self.factors is None:
            return w_in, w_out
        return self.factors.merged("w_in", w_in), self.factors.merged("w_out", w_out)

    def hidden(self, h: torch.Tensor) -> torch.Tensor:
        """The activation between the two projections; h is (tokens, d_in)."""
        act = ACTIVATIONS[self.shape.activation]
        if self.shape.gated:
            gate, up = h.chunk(2, dim=-1)
            return act(gate) * up
        return act(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (tokens, d) -> (tokens, d)
        # frozen_linear: F.linear, or a quantized frozen base weight (hfedmoe.quantize)
        h = frozen_linear(x, self.w_in, self.b_in)
        if self.factors is None:
            return frozen_linear(self.hidden(h), self.w_out, self.b_out)
        a = self.hidden(h + self.factors.apply("w_in", x))
        return frozen_linear(a, self.w_out, self.b_out) + self.factors.apply("w_out", a)


ExpertImpl = Callable[["ExpertBank", torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
EXPERT_IMPLS: dict[str, ExpertImpl] = {}


def register_expert_impl(name: str) -> Callable[[ExpertImpl], ExpertImpl]:
    """Register an expert path under ``name`` (see the module docstring)."""

    def deco(fn: ExpertImpl) -> ExpertImpl:
        EXPERT_IMPLS[name] = fn
        return fn

    return deco


DEFAULT_CAPACITY_FACTOR = 1.25


def expert_capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
    """Rows per expert of the ``"capacity"`` path: ``min(T, ceil(factor * T * k / E))``.

    A token is routed to an expert at most once, so ``T`` rows always suffice; the 1e-9 keeps
    a product such as ``1.1 * 10`` (11.000000000000002) from rounding up to one row more, and
    a positive factor always leaves at least one row.
    """
    rows = math.ceil(capacity_factor * num_tokens * k / num_experts - 1e-9)
    return min(num_tokens, max(rows, 1))


class ExpertBank(nn.Module):
    """The experts of one MoE layer, called like transformers' experts modules.

    ``forward(hidden_states (T, d), top_k_index (T, k), top_k_weights (T, k)) -> (T, d)``.

    ``capacity_factor`` sizes the expert blocks of the ``"capacity"`` path
    (:func:`expert_capacity`); the other paths ignore it. After a ``"capacity"`` call outside
    ``torch.export``/``torch.compile``, ``dropped_pairs`` and ``routed_pairs`` hold that call's
    number of token-expert pairs dropped over capacity and of pairs routed to an expert of the
    bank (0-dim int64 tensors; None before the first such call).
    """

    def __init__(self, shape: ExpertShape, num_experts: int, impl: str = "grouped",
                 detach_frozen: bool = False,
                 capacity_factor: float = DEFAULT_CAPACITY_FACTOR) -> None:
        super().__init__()
        if num_experts < 1:
            raise ModelError(f"num_experts must be >= 1, got {num_experts}")
        self.shape = shape
        self.num_experts = num_experts
        self.experts = nn.ModuleList(Expert(shape) for _ in range(num_experts))
        self.impl = impl
        self.detach_frozen = detach_frozen
        self.capacity_factor = capacity_factor
        self.dropped_pairs: torch.Tensor | None = None
        self.routed_pairs: torch.Tensor | None = None

    @property
    def capacity_factor(self) -> float:
        return self._capacity_factor

    @capacity_factor.setter
    def capacity_factor(self, value: float) -> None:
        if not value > 0 or math.isinf(value):
            raise ModelError(f"capacity_factor must be a finite number > 0, got {value}")
        self._capacity_factor = float(value)

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, name: str) -> None:
        if name not in EXPERT_IMPLS:
            raise ModelError(f"unknown expert path {name!r}; registered: {sorted(EXPERT_IMPLS)}")
        self._impl = name

    def trainable_mask(self) -> list[bool]:
        return [e.trainable for e in self.experts]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        return EXPERT_IMPLS[self._impl](self, hidden_states, top_k_index,
                                        top_k_weights.to(hidden_states.dtype))

    @classmethod
    def from_fused(cls, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, activation: str,
                   impl: str = "grouped") -> ExpertBank:
        """Split transformers' fused (E, 2F, d) / (E, d, F) expert tensors into a bank."""
        num_experts, d_in, d_model = gate_up_proj.shape
        bank = cls(ExpertShape(d_model, d_in // 2, activation, gated=True), num_experts, impl)
        with torch.no_grad():
            for e, expert in enumerate(bank.experts):
                expert.w_in.copy_(gate_up_proj[e])
                expert.w_out.copy_(down_proj[e])
        return bank.to(gate_up_proj.dtype)

    def to_fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformers layout back: (E, 2F, d) and (E, d, F)."""
        w_in = torch.stack([plain_weight(e.w_in).detach() for e in self.experts])
        w_out = torch.stack([plain_weight(e.w_out).detach() for e in self.experts])
        return w_in, w_out


def _frozen_ctx(bank: ExpertBank, expert: Expert) -> torch.autograd.grad_mode.no_grad | None:
    return torch.no_grad() if bank.detach_frozen and not expert.trainable else None


@register_expert_impl("eager")
def eager_experts(bank: ExpertBank, x: torch.Tensor, idx: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor:
    """Reference path: loop over the experts some token was routed to."""
    out = torch.zeros_like(x)  # (T, d)
    flat_idx = idx.reshape(-1)  # (T*k,)
    token = torch.arange(x.shape[0], device=x.device).repeat_interleave(idx.shape[1])  # (T*k,)
    flat_w = weights.reshape(-1)  # (T*k,)
    for e in torch.unique(flat_idx).tolist():
        if not 0 <= e < bank.num_experts:  # capacity-dropped tokens carry an out-of-range id
            continue
        sel = (flat_idx == e).nonzero().reshape(-1)
        tok = token[sel]
        expert = bank.experts[e]
        ctx = _frozen_ctx(bank, expert)
        if ctx is None:
            y = expert(x[tok])
        else:
            with ctx:
                y = expert(x[tok])
        out = out.index_add(0, tok, y * flat_w[sel, None])
    return out


def _contiguous_grad(t: torch.Tensor) -> torch.Tensor:
    # F.grouped_mm's CPU backward rejects expanded (stride-0) output gradients.
    if t.requires_grad:
        t.register_hook(lambda g: g.contiguous())
    return t


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast would give a matmul on ``device`` here, or None outside autocast."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


# F.grouped_mm is missing from older torch builds (e.g. NVIDIA's for JetPack 6); the grouped
# path then runs one GEMM pair per expert block, which is what the sorted path does.
HAS_GROUPED_MM = hasattr(F, "grouped_mm")


def _grouped_mlp(experts: list[Expert], xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Run ``experts[i]`` on consecutive row blocks of ``xs`` of sizes ``counts``."""
    if not HAS_GROUPED_MM:
        return torch.cat([e(block) for e, block in zip(experts, xs.split(counts), strict=True)])
    offs = torch.tensor(counts, dtype=torch.int32, device=xs.device).cumsum(0, dtype=torch.int32)
    dtype = _autocast_dtype(xs.device) or xs.dtype  # autocast does not cover grouped_mm on CPU
    weights = [e.weights() for e in experts]
    w_in = torch.stack([w[0] for w in weights]).transpose(1, 2).to(dtype)  # (G, d, d_in)
    w_out = torch.stack([w[1] for w in weights]).transpose(1, 2).to(dtype)  # (G, d_ff, d)
    h = _contiguous_grad(F.grouped_mm(xs.to(dtype), w_in, offs=offs))  # (N, d_in)
    rows = torch.repeat_interleave(torch.arange(len(experts), device=xs.device),
                                   torch.tensor(counts, device=xs.device))  # (N,)
    if experts[0].b_in is not None:
        h = h + torch.stack([e.b_in for e in experts]).to(dtype)[rows]
    h = experts[0].hidden(h)
    y = _contiguous_grad(F.grouped_mm(h, w_out, offs=offs))  # (N, d)
    if experts[0].b_out is not None:
        y = y + torch.stack([e.b_out for e in experts]).to(dtype)[rows]
    return y


@register_expert_impl("grouped")
def grouped_experts(bank: ExpertBank, x: torch.Tensor, idx: torch.Tensor,
                    weights: torch.Tensor) -> torch.Tensor:
    """Sorted/grouped path: one grouped GEMM for trained experts, one for frozen experts."""
    num_tokens, k = idx.shape
    flat_idx = idx.reshape(-1)  # (T*k,)
    valid = (flat_idx >= 0) & (flat_idx < bank.num_experts)
    token = torch.arange(num_tokens, device=x.device).repeat_interleave(k)[valid]
    flat_idx, flat_w = flat_idx[valid], weights.reshape(-1)[valid]
    order = torch.argsort(flat_idx, stable=True)
    sorted_e, sorted_tok, sorted_w = flat_idx[order], token[order], flat_w[order]
    counts = torch.bincount(sorted_e, minlength=bank.num_experts).tolist()
    # Block boundaries of each expert in the sorted order.
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    out = torch.zeros_like(x)
    trainable = bank.trainable_mask()
    for want in (True, False):
        ids = [e for e in range(bank.num_experts) if counts[e] and trainable[e] == want]
        if not ids:
            continue
        rows = torch.cat([torch.arange(starts[e], starts[e + 1], device=x.device) for e in ids])
        tok = sorted_tok[rows]
        experts = [bank.experts[e] for e in ids]
        if not want and bank.detach_frozen:
            with torch.no_grad():
                y = _grouped_mlp(experts, x[tok], [counts[e] for e in ids])
        else:
            y = _grouped_mlp(experts, x[tok], [counts[e] for e in ids])
        out = out.index_add(0, tok, (y * sorted_w[rows, None]).to(out.dtype))
    return out


# Low-precision CPU GEMMs (oneDNN) compile a kernel for every new shape: 1.3-2.5 ms for an
# expert block of a few hundred rows, 10-15x the GEMM itself once compiled. Routing gives every
# block a new row count each step, so bf16/fp16 blocks are padded to a multiple of this many
# rows, which keeps the set of shapes small and their kernels cached (benchmarks/kernels.py).
LOW_PRECISION_ROW_MULTIPLE = 32


def row_multiple(x: torch.Tensor) -> int:
    """Rows an expert block is padded to a multiple of: 1 except for bf16/fp16 on a CPU."""
    if x.device.type != "cpu":
        return 1
    dtype = _autocast_dtype(x.device) or x.dtype
    return LOW_PRECISION_ROW_MULTIPLE if dtype in (torch.bfloat16, torch.float16) else 1


@register_expert_impl("sorted")
def sorted_experts(bank: ExpertBank, x: torch.Tensor, idx: torch.Tensor,
                   weights: torch.Tensor) -> torch.Tensor:
    """Sort token-expert pairs once; each expert runs ``F.linear`` on its block of rows.

    Weights are used in place (no stacking), frozen experts build no weight gradient (their
    parameters do not require it) and, with ``detach_frozen``, no graph at all. The k outputs of
    a token are put back into slot order by ``index_copy`` (backward: a gather) and summed with
    the routing weights, so no scatter-add runs in the forward pass.
    """
    num_tokens, k = idx.shape
    flat_idx = idx.reshape(-1)  # (T*k,)
    valid = (flat_idx >= 0) & (flat_idx < bank.num_experts)
    slots = torch.arange(flat_idx.numel(), device=x.device)[valid]  # (N,) flat slot ids
    order = torch.argsort(flat_idx[valid], stable=True)
    sorted_slots = slots[order]  # (N,) slot of each sorted row
    counts = torch.bincount(flat_idx[valid], minlength=bank.num_experts).tolist()
    xs = x.index_select(0, torch.div(sorted_slots, k, rounding_mode="floor"))  # (N, d)
    pad = row_multiple(x)
    ys = []
    start = 0
    for e, count in enumerate(counts):
        if not count:
            continue
        expert = bank.experts[e]
        block = xs[start:start + count]
        if pad > 1 and count % pad:  # zero rows: their outputs are dropped, their grads are 0
            block = F.pad(block, (0, 0, 0, pad - count % pad))
        if bank.detach_frozen and not expert.trainable:
            with torch.no_grad():
                ys.append(expert(block)[:count])
        else:
            ys.append(expert(block)[:count])
        start += count
    if not ys:
        return torch.zeros_like(x)
    y = torch.cat(ys) if len(ys) > 1 else ys[0]  # (N, d) in sorted order
    per_slot = y.new_zeros(num_tokens * k, x.shape[1]).index_copy(0, sorted_slots, y)  # (T*k, d)
    per_slot = per_slot.view(num_tokens, k, -1) * weights.unsqueeze(-1)  # (T, k, d)
    return per_slot.sum(1).to(x.dtype)  # (T, d)


@register_expert_impl("dense")
def dense_experts(bank: ExpertBank, x: torch.Tensor, idx: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor:
    """Static-shape path: every expert on every token, masked by the routing weights."""
    valid = (idx >= 0) & (idx < bank.num_experts)
    safe_idx = torch.where(valid, idx, torch.zeros_like(idx))
    combine = torch.zeros(x.shape[0], bank.num_experts, dtype=x.dtype, device=x.device)
    combine = combine.scatter_add(1, safe_idx, weights * valid.to(weights.dtype))  # (T, E)
    out = torch.zeros_like(x)
    for e, expert in enumerate(bank.experts):
        ctx = _frozen_ctx(bank, expert)
        if ctx is None:
            y = expert(x)
        else:
            with ctx:
                y = expert(x)
        out = out + y * combine[:, e : e + 1]
    return out


@register_expert_impl("capacity")
def capacity_experts(bank: ExpertBank, x: torch.Tensor, idx: torch.Tensor,
                     weights: torch.Tensor) -> torch.Tensor:
    """Static-shape path with ``cap`` rows per expert (:func:`expert_capacity`).

    The N = T*k token-expert pairs in flat slot order (token-major): a pair's position in its
    expert is the number of earlier pairs routed to the same expert (a cumulative sum over a
    one-hot (N, E)); pairs at position >= cap, and pairs with an out-of-range id, are dropped.
    A kept pair goes to dispatch slot ``expert * cap + position``, a dropped one to the dump
    slot ``E * cap``. A scatter gives each dispatch slot its token (unused slots: a zero row
    appended to ``x``), each expert runs :meth:`Expert.forward` on its (cap, d) block, and
    every pair gathers its row back (the dump slot's row is zero), scaled by its routing weight.
    No shape depends on the routing, so the path goes through ``torch.export``.
    """
    num_tokens, k = idx.shape
    num_experts = bank.num_experts
    cap = expert_capacity(num_tokens, k, num_experts, bank.capacity_factor)
    if cap == 0:  # no tokens
        return torch.zeros_like(x)
    flat = idx.reshape(-1).long()  # (N,)
    experts = torch.arange(num_experts, device=x.device)
    onehot = (flat[:, None] == experts[None, :]).to(torch.int64)  # (N, E); 0 rows: out of range
    routed = onehot.sum(1)  # (N,) 1 for an in-range id
    position = (onehot.cumsum(0) * onehot).sum(1) - 1  # (N,) earlier pairs of the same expert
    kept = (routed > 0) & (position < cap)  # (N,)
    dump = num_experts * cap
    safe = torch.where(kept, flat, torch.zeros_like(flat))
    slot = torch.where(kept, safe * cap + position, torch.full_like(flat, dump))  # (N,)
    pair_token = torch.arange(num_tokens, device=x.device)[:, None].expand(num_tokens, k)
    pair_token = pair_token.reshape(-1)  # (N,) token of every pair
    # token of every dispatch slot (+ the dump slot); unused slots: the zero row num_tokens
    src = torch.full((dump + 1,), num_tokens, dtype=torch.int64, device=x.device)
    src = src.scatter(0, slot, pair_token)[:dump]  # (E*cap,)
    x_pad = torch.cat([x, x.new_zeros(1, x.shape[1])])  # (T+1, d)
    xs = x_pad[src].view(num_experts, cap, x.shape[1])  # (E, cap, d)
    ys = []
    for e, expert in enumerate(bank.experts):
        ctx = _frozen_ctx(bank, expert)
        if ctx is None:
            ys.append(expert(xs[e]))
        else:
            with ctx:
                ys.append(expert(xs[e]))
    ys.append(ys[0].new_zeros(1, x.shape[1]))  # the dump slot's row
    y = torch.cat(ys)  # (E*cap + 1, d)
    per_pair = y[slot] * (weights.reshape(-1) * kept.to(weights.dtype))[:, None].to(y.dtype)
    if not torch.compiler.is_compiling():
        bank.routed_pairs = routed.sum().detach()
        bank.dropped_pairs = bank.routed_pairs - kept.sum().detach()
    return per_pair.view(num_tokens, k, -1).sum(1).to(x.dtype)  # (T, d)
