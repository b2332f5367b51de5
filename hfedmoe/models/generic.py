"""One adapter for every transformers family whose experts use ``use_experts_implementation``.

transformers 5 decorates the fused experts module of most MoE families with
``transformers.integrations.moe.use_experts_implementation(...)``; the decorator records the
fused layout on each instance (``has_gate``, ``has_bias``, ``is_transposed``,
``is_concatenated``, ``has_post_expert_norm``) and the module is always called as
``experts(hidden_states (T, d), top_k_index (T, k), top_k_weights (T, k))``. That is enough to
convert any such family without a hand-written adapter:

- every module carrying those flags is split into an :class:`~hfedmoe.experts.ExpertBank`
  (``gate_up_proj`` / ``up_proj``, ``down_proj`` and their biases; transposed weights are
  transposed back, interleaved ``[g0, u0, g1, u1, ...]`` rows are reordered into ``[gate; up]``);
- a family's own gating (``_apply_gate``, e.g. GPT-OSS's clamped SwiGLU) or an activation the
  kit does not know (``relu2``) is kept: the experts then run that function as their hidden
  activation (:class:`FamilyExpert`), on every expert path;
- the block's router is left untouched; :class:`InterfaceExperts` passes the routed ids it is
  called with, and the router's logits (read by a forward hook on the router while a capture is
  on), through a parameterless tap module, which is what ``MoEModel.capture`` hooks. Sigmoid
  routers (DeepSeek-V3 style) are marked ``score_fn="sigmoid"``;
- modules of the MoE block whose name holds ``shared`` (shared experts and their gates) become
  shared parts (``shared.*`` keys): they train with the shared parts, never as a selectable
  expert.

What cannot be converted (a post-expert norm, no router beside the experts, no top-k) raises a
:class:`~hfedmoe.errors.ModelError` naming what is missing.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hfedmoe.errors import ModelError
from hfedmoe.experts import ACTIVATIONS, Expert, ExpertBank, ExpertShape
from hfedmoe.models.base import MoELayer, ScoreFn, decode_topk_router

INTERFACE_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated",
                   "has_post_expert_norm")


# --- which families use the interface --------------------------------------------------------
@cache
def modeling_uses_interface(model_type: str) -> bool:
    """Whether transformers' modeling file of ``model_type`` decorates experts with the interface.

    Read from the source text (no import of the modeling module)."""
    try:
        import transformers
        from transformers.models.auto.configuration_auto import model_type_to_module_name
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    module = model_type_to_module_name(model_type)
    folder = Path(transformers.__file__).parent / "models" / module
    for path in sorted(folder.glob("modeling_*.py")):
        if "use_experts_implementation" in path.read_text(encoding="utf-8", errors="ignore"):
            return True
    return False


def interface_model_types() -> list[str]:
    """Every model_type transformers knows whose modeling file uses the experts interface."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return sorted(t for t in CONFIG_MAPPING_NAMES if modeling_uses_interface(t))


def is_interface_experts(module: nn.Module) -> bool:
    return all(hasattr(module, flag) for flag in INTERFACE_FLAGS) and (
        hasattr(module, "down_proj"))


# --- the experts' hidden activation ----------------------------------------------------------
def _probe_activation(act_fn: Callable[[torch.Tensor], torch.Tensor]) -> str | None:
    """The kit's name of ``act_fn`` (compared on values), or None when the kit has none."""
    x = torch.linspace(-8, 8, 257, dtype=torch.float64)
    try:
        y = act_fn(x)
    except Exception:  # noqa: BLE001 - a family activation we cannot probe: keep it as is
        return None
    for name in ("silu", "gelu", "gelu_pytorch_tanh", "relu"):
        if torch.allclose(ACTIVATIONS[name](x), y, rtol=0, atol=1e-7):
            return name
    return None


class _FamilyGate:
    """The family's own gate/activation as a function of the (tokens, d_in) projection."""

    def __init__(self, experts: nn.Module, gated: bool, concatenated: bool,
                 custom_gate: bool) -> None:
        # A parameterless stand-in for the experts module: what _apply_gate/act_fn read
        # (alpha, limit, act_fn, ...), without keeping the fused tensors alive.
        attrs = {k: v for k, v in vars(experts).items()
                 if not k.startswith("_") and not isinstance(v, torch.Tensor)}
        attrs.update(experts._modules)
        self.proxy = types.SimpleNamespace(**attrs)
        self.apply_gate = type(experts)._apply_gate if custom_gate else None
        self.gated = gated
        self.concatenated = concatenated

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            return self.proxy.act_fn(h)
        if self.apply_gate is None:  # default gating with an activation the kit lacks
            gate, up = h.chunk(2, dim=-1)
            return self.proxy.act_fn(gate) * up
        if not self.concatenated:  # the family expects [g0, u0, g1, u1, ...]
            gate, up = h.chunk(2, dim=-1)
            h = torch.stack((gate, up), dim=-1).flatten(-2)
        return self.apply_gate(self.proxy, h)


class FamilyExpert(Expert):
    """An expert whose activation between the projections is the family's own function."""

    def __init__(self, shape: ExpertShape, gate_fn: _FamilyGate) -> None:
        super().__init__(shape)
        self.gate_fn = gate_fn

    def hidden(self, h: torch.Tensor) -> torch.Tensor:
        return self.gate_fn(h)


# --- the converted experts module ------------------------------------------------------------
class RouterTap(nn.Module):
    """Parameterless: returns ``(router_logits, top_k_weights, top_k_index)`` of one call.

    ``MoEModel.capture`` hooks this module (:attr:`MoELayer.tap`). The router's logits are
    recorded by :meth:`record` (a forward hook on the family's router) only while the tap itself
    is hooked, so nothing is kept outside a capture."""

    def __init__(self, router: nn.Module, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.last_logits: torch.Tensor | None = None
        # Kept outside the module tree (no duplicate parameters); for the fallback below.
        self._router = [router]

    def record(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        if not self._forward_hooks:
            return
        self.last_logits = _find_logits(output, self.num_experts)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, self.last_logits = self.last_logits, None
        if logits is None or logits.reshape(-1, self.num_experts).shape[0] != \
                hidden_states.shape[0]:
            weight, bias = router_weight(self._router[0], self.num_experts,
                                         hidden_states.shape[-1]) or (None, None)
            if weight is None:
                raise ModelError("router logits were not recorded and the router has no "
                                 "(experts, d_model) weight to compute them from")
            logits = F.linear(hidden_states.float(), weight.float(),
                              None if bias is None else bias.float())
        return logits.detach(), top_k_weights.detach(), top_k_index.detach()


def _find_logits(output: Any, num_experts: int) -> torch.Tensor | None:
    items = output if isinstance(output, tuple | list) else (output,)
    for t in items:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.shape[-1] == num_experts:
            return t.detach()
    return None


class InterfaceExperts(nn.Module):
    """An :class:`ExpertBank` called the way the family calls its experts."""

    def __init__(self, bank: ExpertBank, tap: RouterTap) -> None:
        super().__init__()
        self.bank = bank
        self.tap = tap

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        idx = top_k_index.reshape(x.shape[0], -1)
        w = top_k_weights.reshape(x.shape[0], -1)
        if self.tap._forward_hooks:
            self.tap(x, idx, w)
        return self.bank(x, idx, w).reshape(shape)


# --- conversion ------------------------------------------------------------------------------
def _split(experts: nn.Module, name: str) -> torch.Tensor:
    t = getattr(experts, name, None)
    if not isinstance(t, torch.Tensor) or t.dim() != 3:
        raise ModelError(f"{type(experts).__name__}: no fused 3-D tensor {name!r}")
    return t.detach()


def bank_from_interface(experts: nn.Module, impl: str = "grouped") -> ExpertBank:
    """Split an interface experts module's fused tensors into per-expert parameters."""
    cls = type(experts).__name__
    if experts.has_post_expert_norm:
        raise ModelError(f"{cls}: has_post_expert_norm (a norm after every expert) is not "
                         "supported by the kit's expert paths")
    if getattr(experts, "_is_expert_parallel", False):
        raise ModelError(f"{cls}: expert-parallel (sharded) experts cannot be converted")
    gated = bool(experts.has_gate)
    w_in = _split(experts, "gate_up_proj" if gated else "up_proj")  # (E, d_in, d) or (E, d, d_in)
    w_out = _split(experts, "down_proj")  # (E, d, F) or (E, F, d)
    if experts.is_transposed:
        w_in, w_out = w_in.transpose(1, 2), w_out.transpose(1, 2)
    b_in = b_out = None
    if experts.has_bias:
        prefix = "gate_up_proj" if gated else "up_proj"
        b_in = getattr(experts, f"{prefix}_bias", None)
        b_out = getattr(experts, "down_proj_bias", None)
        if b_in is None or b_out is None:
            raise ModelError(f"{cls}: has_bias but no {prefix}_bias/down_proj_bias")
        b_in, b_out = b_in.detach(), b_out.detach()
    num_experts, d_in, d_model = w_in.shape
    if tuple(w_out.shape) != (num_experts, d_model, d_in // (2 if gated else 1)):
        raise ModelError(f"{cls}: down_proj {tuple(w_out.shape)} does not match "
                         f"the up projection {tuple(w_in.shape)}")
    concatenated = bool(experts.is_concatenated)
    if gated and not concatenated:  # [g0, u0, g1, u1, ...] -> [gate; up]
        w_in = torch.cat((w_in[:, 0::2], w_in[:, 1::2]), dim=1)
        if b_in is not None:
            b_in = torch.cat((b_in[:, 0::2], b_in[:, 1::2]), dim=1)
    custom_gate = gated and _has_custom_gate(experts)
    act_fn = getattr(experts, "act_fn", None)
    activation = _probe_activation(act_fn) if act_fn is not None else None
    if not custom_gate and act_fn is None:
        raise ModelError(f"{cls}: no act_fn and no _apply_gate: unknown expert activation")
    d_ff = d_in // (2 if gated else 1)
    shape = ExpertShape(d_model, d_ff, activation or "silu", gated=gated,
                        bias=experts.has_bias)
    bank = ExpertBank(shape, num_experts, impl)
    if custom_gate or activation is None:
        gate_fn = _FamilyGate(experts, gated, concatenated, custom_gate)
        bank.experts = nn.ModuleList(FamilyExpert(shape, gate_fn) for _ in range(num_experts))
    with torch.no_grad():
        for e, expert in enumerate(bank.experts):
            expert.w_in.copy_(w_in[e])
            expert.w_out.copy_(w_out[e])
            if b_in is not None:
                expert.b_in.copy_(b_in[e])
                expert.b_out.copy_(b_out[e])
    return bank.to(w_in.dtype)


def _has_custom_gate(experts: nn.Module) -> bool:
    from transformers.integrations.moe import _default_apply_gate

    return getattr(type(experts), "_apply_gate", _default_apply_gate) is not _default_apply_gate


_ROUTER_NAMES = ("gate", "router", "mlp_router", "moe_router", "gating", "router_gate")


def router_weight(router: nn.Module, num_experts: int,
                  d_model: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The router's (E, d) weight (its own or its single inner linear's) and matching bias."""
    found = [(name, p) for name, p in router.named_parameters()
             if tuple(p.shape) == (num_experts, d_model)]
    if len(found) != 1:
        return None
    name, weight = found[0]
    owner = router.get_submodule(name.rpartition(".")[0]) if "." in name else router
    bias = getattr(owner, "bias", None)
    if not (isinstance(bias, torch.Tensor) and tuple(bias.shape) == (num_experts,)):
        bias = None
    return weight, bias


def find_router(block: nn.Module, num_experts: int, d_model: int, where: str) -> nn.Module:
    """The router beside the experts: a child holding one (E, d) weight (maybe in a linear)."""
    candidates = []
    for name, child in block.named_children():
        if "shared" in name or is_interface_experts(child) or isinstance(child, InterfaceExperts):
            continue
        if router_weight(child, num_experts, d_model) is not None:
            candidates.append((name not in _ROUTER_NAMES, name, child))
    if not candidates:
        raise ModelError(f"{where}: no router module (a child with an ({num_experts}, "
                         f"{d_model}) weight) beside the experts")
    return sorted(candidates, key=lambda c: c[:2])[0][2]


_TOPK_ATTRS = ("top_k", "topk", "num_experts_per_tok", "moe_topk", "moe_k",
               "num_selected_experts", "experts_per_token", "num_experts_per_token")


def _top_k(router: nn.Module, block: nn.Module, cfg: Any, where: str) -> int:
    for obj in (router, block, cfg):
        for attr in _TOPK_ATTRS:
            value = getattr(obj, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
            if isinstance(value, list | tuple) and value and isinstance(value[0], int):
                return int(value[0])
    raise ModelError(f"{where}: cannot tell the router's top-k (none of {_TOPK_ATTRS})")


def _source(cls: type) -> str:
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):
        return ""


def _score_fn(router: nn.Module, block: nn.Module, cfg: Any) -> ScoreFn:
    for attr in ("scoring_func", "score_func", "router_score_function", "moe_router_activation",
                 "router_activation"):
        value = getattr(cfg, attr, None)
        if isinstance(value, str):
            return "sigmoid" if "sigmoid" in value.lower() else "softmax"
    src = _source(type(router)) + _source(type(block))
    if "sigmoid" in src and "softmax" not in src:
        return "sigmoid"
    return "softmax"


def shared_parts(block: nn.Module, path: str) -> dict[str, nn.Module]:
    """Children of an MoE block named ``*shared*`` with parameters (shared experts, gates)."""
    return {f"{path}.{name}" if path else name: child for name, child in block.named_children()
            if "shared" in name and any(True for _ in child.parameters())}


def convert_interface_blocks(model: nn.Module, impl: str = "grouped", prefix: str = "",
                             family: str = "") -> tuple[list[MoELayer], dict[str, nn.Module]]:
    """Convert every interface experts module of ``model``; MoE layers and shared parts."""
    cfg = getattr(model, "config", None)
    found = [(path, m) for path, m in model.named_modules() if is_interface_experts(m)]
    if not found:
        raise ModelError(f"{family or type(model).__name__}: no experts module using "
                         "transformers' use_experts_implementation interface")
    modules = dict(model.named_modules())
    layers: list[MoELayer] = []
    shared: dict[str, nn.Module] = {}
    for path, experts in found:
        parent_path, _, attr = path.rpartition(".")
        block = modules[parent_path] if parent_path else model
        where = f"{family}: {prefix}{path}"
        bank = bank_from_interface(experts, impl)
        router = find_router(block, bank.num_experts, bank.shape.d_model, where)
        top_k = _top_k(router, block, getattr(experts, "config", cfg), where)
        tap = RouterTap(router, bank.num_experts)
        router.register_forward_hook(tap.record)
        setattr(block, attr, InterfaceExperts(bank, tap))
        sub_cfg = getattr(experts, "config", cfg)
        layers.append(MoELayer(len(layers), f"{prefix}{parent_path}", bank, router, top_k,
                               _score_fn(router, block, sub_cfg), decode_topk_router, tap=tap))
        shared.update(shared_parts(block, f"{prefix}{parent_path}"))
    return layers, shared
