"""Weight-only quantization of a model's frozen base (``model.quantize``), model level: which
tensors of a :class:`~hfedmoe.models.base.MoEModel` are stored quantized and how they are
replaced in place. The tensor level (torchao tensors, the frozen linear) is
:mod:`hfedmoe.quantize`, whose module doc says what is quantized and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from hfedmoe.errors import ConfigError
from hfedmoe.models.base import MoEModel
from hfedmoe.names import parse_key
from hfedmoe.quantize import (
    EXPERT_WEIGHTS,
    QuantizedLinear,
    _torchao,
    check_mode,
    is_quantized,
    quantize_weight,
    release_freed_memory,
    weight_bytes,
    weight_mode,
)


@dataclass
class QuantizeReport:
    """What :func:`quantize_model` stored quantized (tensor names are module paths or keys)."""

    mode: str
    experts: int = 0  # expert weights (w_in, w_out) quantized by this call
    linears: int = 0  # other nn.Linear weights quantized by this call
    int8_fallback: list[str] = field(default_factory=list)  # int4 asked, int8 stored
    bytes_before: int = 0
    bytes_after: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "experts": self.experts, "linears": self.linears,
                "int8_fallback": len(self.int8_fallback), "bytes_before": self.bytes_before,
                "bytes_after": self.bytes_after}


def _protected(model: MoEModel) -> set[int]:
    """ids of what must stay float: every federated tensor but the expert weights and the
    LoRA bases (frozen in the LoRA rounds a quantized base needs)."""
    keep = set()
    for key in model.keys():
        pk = parse_key(key)
        if not (pk.kind == "expert" and pk.param in EXPERT_WEIGHTS) \
                and key not in model.lora_bases:
            keep.add(id(model.parameter(key)))
    return keep


def frozen_linears(model: MoEModel) -> list[tuple[str, nn.Linear]]:
    """The network's ``nn.Linear`` modules that hold no federated tensor and no tied weight."""
    protected = _protected(model)
    uses: dict[int, int] = {}
    for _, p in model.module.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    out = []
    for name, mod in model.module.named_modules():
        if type(mod) is not nn.Linear or is_quantized(mod.weight):
            continue
        params = [mod.weight] + ([mod.bias] if mod.bias is not None else [])
        if any(id(p) in protected for p in params) or uses.get(id(mod.weight), 0) > 1:
            continue
        out.append((name, mod))
    return out


def quantize_model(model: MoEModel, mode: str) -> QuantizeReport:
    """Store the frozen base of ``model`` quantized, in place (see the module doc).

    Idempotent: weights already stored quantized stay as they are, so a device may call it
    after every load. ``"none"`` does nothing.

    Raises:
        ConfigError: a bad mode, torchao missing, or an expert weight that trains now
            (full fine-tuning: a quantized base needs ``train.adapter = "lora"``).
    """
    check_mode(mode)
    report = QuantizeReport(mode)
    if mode == "none":
        return report
    _torchao()
    report.bytes_before = weight_bytes(model.module)
    for layer in model.layers:
        for e, expert in enumerate(layer.bank.experts):
            for name in EXPERT_WEIGHTS:
                w = getattr(expert, name)
                if is_quantized(w):
                    continue
                key = f"layers.{layer.layer_idx}.experts.{e}.{name}"
                if w.requires_grad:
                    raise ConfigError(f"{key} trains (train.adapter = 'full'); "
                                      f"a quantized base needs train.adapter = \"lora\"")
                q = quantize_weight(w, mode)
                if mode == "int4" and weight_mode(q) == "int8":
                    report.int8_fallback.append(key)
                model.replace_expert_weight(key, nn.Parameter(q, requires_grad=False))
                report.experts += 1
    bases = {id(lin.weight): key for key, lin in model.lora_bases.items()}
    for name, mod in frozen_linears(model):
        q = quantize_weight(mod.weight, mode)
        if mode == "int4" and weight_mode(q) == "int8":
            report.int8_fallback.append(name)
        parent_name, _, child = name.rpartition(".")
        parent = model.module.get_submodule(parent_name) if parent_name else model.module
        qlinear = QuantizedLinear(q, mod.bias)
        setattr(parent, child, qlinear)
        if id(mod.weight) in bases:  # a LoRA base: its key now names the quantized weight
            model.replace_base_linear(bases[id(mod.weight)], qlinear)
        report.linears += 1
    report.bytes_after = weight_bytes(model.module)
    release_freed_memory()
    return report


def quantized_keys(model: MoEModel) -> list[str]:
    """Canonical keys of the weights ``model`` stores quantized."""
    return [k for k in model.keys() if is_quantized(model.parameter(k))]
