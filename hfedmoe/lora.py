"""LoRA factors of expert weights: their canonical keys, their wire spec, and exact expansion.

A client that fine-tunes an expert with LoRA sends, instead of the dense delta of a weight
``W`` (out_features, in_features), its two factors under keys next to the weight's own::

    layers.{l}.experts.{e}.w_in.lora_A    (r, in_features)
    layers.{l}.experts.{e}.w_in.lora_B    (out_features, r)

with ``delta W = (lora_alpha / r) * B @ A`` (Hu et al. 2021). Averaging A and B separately is
not the average of the clients' updates (mean(B) @ mean(A) != mean(B @ A)), so the server
expands every pair into its product with :func:`expand` before aggregation: the weighted sums
of Eq. 17 then average exactly the products, the result merges into the global expert, and
the next round starts from fresh factors. An expert's ``w_in`` and ``w_out`` carry factors,
and so do the frozen linear weights of the base a model lists as its ``lora_bases`` (shared
experts' projections, targeted attention projections; :mod:`hfedmoe.models.lora_targets`)
under ``shared.{path}.weight.lora_A``/``lora_B``; biases, gates and what is genuinely small
(a task head, a shared expert's scalar gate) travel as dense deltas as before.

Malformed factors (a missing partner, a rank or inner dimension that does not match, a factor
sent together with a dense delta of the same weight) raise :class:`~hfedmoe.errors.WireError`
subclasses, like any other bad payload.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from hfedmoe.errors import ConfigError, ModelError, SchemaError, ShapeError
from hfedmoe.names import ExpertId, parse_key
from hfedmoe.update import SparseUpdate
from hfedmoe.wire import ModelSpec, ParamSpec

FACTOR_PARAMS = ("w_in", "w_out")
LORA_A, LORA_B = "lora_A", "lora_B"


@dataclass(frozen=True)
class LoRASpec:
    """Rank and scaling of the LoRA factors; ``scale = alpha / rank``."""

    rank: int = 8
    alpha: float = 16.0

    def __post_init__(self) -> None:
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise ConfigError(f"LoRA rank must be an int >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            raise ConfigError(f"LoRA alpha must be > 0, got {self.alpha!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class ExpertFactors:
    """The LoRA factors of one expert's ``w_in`` and ``w_out`` for one round.

    Plain tensors with ``requires_grad`` (not registered module parameters), so the model's
    canonical parameters, state and hash do not change while they are attached. A starts
    Kaiming-uniform (as in PEFT) from ``generator``, B at zero, so the expert starts exactly
    at its base weights.
    """

    def __init__(self, w_in: torch.Tensor, w_out: torch.Tensor, lora: LoRASpec,
                 generator: torch.Generator | None = None) -> None:
        self.scale = lora.scale
        self.factors: dict[str, torch.Tensor] = {}
        for name, w in (("w_in", w_in), ("w_out", w_out)):
            out_f, in_f = w.shape
            bound = 1.0 / math.sqrt(in_f)  # kaiming_uniform_(a=sqrt(5)) on (r, in_f)
            a = (torch.rand(lora.rank, in_f, generator=generator) * 2 - 1) * bound
            self.factors[f"{name}.{LORA_A}"] = a.to(w.device, torch.float32).requires_grad_()
            self.factors[f"{name}.{LORA_B}"] = torch.zeros(
                out_f, lora.rank, device=w.device, dtype=torch.float32, requires_grad=True)

    def apply(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``scale * x A^T B^T``: the factors' share of ``F.linear(x, W)``, computed through
        rank r, so that no gradient of the full weight is ever formed."""
        a, b = self.factors[f"{name}.{LORA_A}"], self.factors[f"{name}.{LORA_B}"]
        return F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)) * self.scale

    def merged(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """``W + scale * B A`` (for paths that need the weight itself, e.g. grouped GEMMs)."""
        a, b = self.factors[f"{name}.{LORA_A}"], self.factors[f"{name}.{LORA_B}"]
        return w + (b @ a).to(w.dtype) * self.scale


class LinearFactors:
    """The LoRA factors of one frozen ``nn.Linear`` of the base (a shared expert's projection,
    an attention projection) for one round: ``A`` (r, in) Kaiming-uniform from ``generator``,
    ``B`` (out, r) zero, applied by a forward hook that adds ``scale * x A^T B^T`` to the
    layer's output (no gradient of the weight is formed). :meth:`remove` takes the hook off:
    the layer is its base weight again."""

    def __init__(self, linear: torch.nn.Module, lora: LoRASpec,
                 generator: torch.Generator | None = None) -> None:
        self.scale = lora.scale
        w = linear.weight
        out_f, in_f = w.shape
        bound = 1.0 / math.sqrt(in_f)
        a = (torch.rand(lora.rank, in_f, generator=generator) * 2 - 1) * bound
        self.factors: dict[str, torch.Tensor] = {
            LORA_A: a.to(w.device, torch.float32).requires_grad_(),
            LORA_B: torch.zeros(out_f, lora.rank, device=w.device, dtype=torch.float32,
                                requires_grad=True)}
        self._handle = linear.register_forward_hook(self._hook)

    def _hook(self, _module: torch.nn.Module, inputs: tuple[Any, ...],
              output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        a, b = self.factors[LORA_A], self.factors[LORA_B]
        return output + F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)) * self.scale

    def remove(self) -> None:
        self._handle.remove()


def factor_params(d_model: int, d_in: int, d_ff: int, lora: LoRASpec) -> int:
    """Factor elements of one expert: ``w_in`` (d_in, d_model) and ``w_out`` (d_model, d_ff)."""
    return lora.rank * (d_in + d_model) + lora.rank * (d_model + d_ff)


def attach_factors(model: Any, experts: Iterable[ExpertId], lora: LoRASpec,
                   generator: torch.Generator | None = None) -> dict[ExpertId, ExpertFactors]:
    """Freeze the base ``w_in``/``w_out`` of ``experts`` and give each fresh factors (drawn
    from ``generator`` in sorted expert order), after ``model.set_trainable(experts)``."""
    out: dict[ExpertId, ExpertFactors] = {}
    for e in sorted(experts):
        expert = model.layer(e.layer_idx).bank.experts[e.expert_idx]
        expert.w_in.requires_grad_(False)
        expert.w_out.requires_grad_(False)
        expert.factors = out[e] = ExpertFactors(expert.w_in, expert.w_out, lora, generator)
    return out


def detach_factors(model: Any, experts: Iterable[ExpertId]) -> None:
    """Remove the experts' factors: the model is its base weights again."""
    for e in experts:
        model.layer(e.layer_idx).bank.experts[e.expert_idx].factors = None


def factor_keys(weight_key: str) -> tuple[str, str]:
    """The (A, B) keys of an expert weight's factors."""
    return f"{weight_key}.{LORA_A}", f"{weight_key}.{LORA_B}"


def split_factor_key(key: str) -> tuple[str, str] | None:
    """``(weight_key, "lora_A" | "lora_B")`` for a factor key of an expert weight or of a
    shared (base) weight, else None. Which shared weights may carry factors is the wire
    spec's to say (:func:`with_factors`)."""
    base, _, part = key.rpartition(".")
    if part not in (LORA_A, LORA_B) or not base:
        return None
    try:
        pk = parse_key(base)
    except ModelError:
        return None
    if pk.kind == "expert" and pk.param in FACTOR_PARAMS:
        return base, part
    if pk.kind == "shared" and pk.param.endswith("weight"):
        return base, part
    return None


def with_factors(spec: ModelSpec, lora: LoRASpec, bases: Iterable[str] = ()) -> ModelSpec:
    """``spec`` plus the factor keys of every expert ``w_in``/``w_out`` and of the shared base
    weights ``bases`` (a model's ``lora_bases``: shared experts' and targeted attention
    projections' weights): what a LoRA update may carry; the factors' shapes fix the rank."""
    params: dict[str, ParamSpec] = dict(spec.params)
    extra = set(bases)
    for key, p in spec.params.items():
        try:
            pk = parse_key(key)
        except ModelError:
            continue
        expert = pk.kind == "expert" and pk.param in FACTOR_PARAMS
        if not (expert or key in extra) or len(p.shape) != 2:
            continue
        out_f, in_f = p.shape
        a, b = factor_keys(key)
        params[a] = ParamSpec((lora.rank, in_f), p.dtypes)
        params[b] = ParamSpec((out_f, lora.rank), p.dtypes)
    return ModelSpec(params, spec.experts)


def product(a: torch.Tensor, b: torch.Tensor, lora: LoRASpec) -> torch.Tensor:
    """``scale * B @ A`` in float32: the dense delta the factors stand for."""
    return (b.to(torch.float32) @ a.to(torch.float32)) * lora.scale  # (out, in)


def expand(update: SparseUpdate, lora: LoRASpec) -> SparseUpdate:
    """``update`` with every (A, B) pair replaced by the dense delta ``scale * B @ A``.

    Raises:
        SchemaError: a factor without its partner, or factors and a dense delta of one weight.
        ShapeError: factor shapes that do not multiply or do not have rank ``lora.rank``.
    """
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    deltas: dict[str, torch.Tensor] = {}
    for key, t in update.deltas.items():
        split = split_factor_key(key)
        if split is None:
            deltas[key] = t
        else:
            pairs.setdefault(split[0], {})[split[1]] = t
    for base, parts in sorted(pairs.items()):
        if set(parts) != {LORA_A, LORA_B}:
            have = ", ".join(sorted(parts))
            raise SchemaError(f"{base}: LoRA factors come in pairs, got only {have}")
        if base in deltas:
            raise SchemaError(f"{base}: both a dense delta and LoRA factors")
        a, b = parts[LORA_A], parts[LORA_B]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != lora.rank or b.shape[1] != lora.rank:
            raise ShapeError(f"{base}: factors {tuple(a.shape)} / {tuple(b.shape)} are not of "
                             f"rank {lora.rank}")
        deltas[base] = product(a, b, lora)
    return dataclasses.replace(update, deltas=deltas)


def factor_bytes(shapes: Mapping[str, tuple[int, ...]], lora: LoRASpec,
                 itemsize: int = 4) -> int:
    """Bytes of the factors of the given expert weights (key -> (out, in)) on the wire."""
    return sum((lora.rank * (s[0] + s[1])) * itemsize for s in shapes.values())


__all__ = ["FACTOR_PARAMS", "LORA_A", "LORA_B", "ExpertFactors", "LinearFactors", "LoRASpec",
           "attach_factors",
           "detach_factors", "expand", "factor_bytes", "factor_keys", "factor_params", "product",
           "split_factor_key", "with_factors"]
