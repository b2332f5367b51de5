"""Random weights for a model planned on the meta device, one tensor at a time.

A real-size MoE (OLMoE-1B-7B: 6.9 B parameters, 27.7 GB in fp32) does not fit a small host in
full precision, yet a device trains it from a quantized base of a few GB. :func:`materialize`
gives every tensor of a model built by :func:`hfedmoe.models.plan.build_meta_model` storage on
the CPU, one tensor at a time, with random values (normal with the config's
``initializer_range``, norms 1, biases 0); with ``quantize`` each expert weight is stored as
``model.quantize`` stores it (:func:`hfedmoe.quantize.quantize_weight`) as soon as it exists, so
the full-precision experts are never held together. Buffers computed at construction (rotary
frequencies) are rebuilt on the CPU from the config. The result is the model a device holds
after ``quantize_model``, at its real shapes, for measuring memory and step time; the values are
random (no weights are downloaded).
"""

from __future__ import annotations

import torch
from torch import nn

from hfedmoe.errors import ModelError
from hfedmoe.models.base import MoEModel
from hfedmoe.quantize import EXPERT_WEIGHTS, check_mode, quantize_weight, release_freed_memory


def _expert_weights(model: MoEModel) -> set[int]:
    return {id(getattr(expert, name)) for layer in model.layers
            for expert in layer.bank.experts for name in EXPERT_WEIGHTS}


def _random(p: nn.Parameter, name: str, std: float, gen: torch.Generator,
            dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.empty(p.shape, dtype=dtype, device=device)
    if name.endswith("bias"):
        return t.zero_()
    if p.dim() == 1:  # norms' scales
        return t.fill_(1.0)
    return t.normal_(0.0, std, generator=gen)


def _rebuild_buffers(model: MoEModel, device: torch.device) -> None:
    """Modules whose buffers are still on the meta device (rotary frequencies, computed in
    ``__init__``), built again on the CPU from the model's config."""
    cfg = getattr(model.module, "config", None)
    for path, mod in list(model.module.named_modules()):
        if not any(b.is_meta for b in mod.buffers(recurse=False)):
            continue
        try:
            with torch.device(device):
                fresh = type(mod)(config=cfg)
        except Exception as exc:  # noqa: BLE001 - any constructor that cannot take the config
            raise ModelError(f"{path}: cannot rebuild its buffers on the CPU "
                             f"({type(exc).__name__}: {exc})") from exc
        parent, _, child = path.rpartition(".")
        setattr(model.module.get_submodule(parent) if parent else model.module, child, fresh)


def materialize(model: MoEModel, quantize: str = "none", seed: int = 0,
                device: str | torch.device = "cpu") -> MoEModel:
    """Give every meta tensor of ``model`` random values on the CPU, in place (module doc).

    Args:
        quantize: ``"none"``, ``"int8"`` or ``"int4"``: how expert weights are stored (frozen:
            they train only through LoRA factors then). Other weights are fp32; store them
            quantized with :func:`hfedmoe.models.quantize.quantize_model` afterwards.
        seed: the random values' seed (values differ between devices).
        device: where the tensors live (``"cuda"``: on the GPU, with no host copy).

    Raises:
        ConfigError: a bad ``quantize``.  ModelError: a buffer that cannot be rebuilt.
    """
    check_mode(quantize)
    cfg = getattr(model.module, "config", None)
    std = float(getattr(cfg, "initializer_range", 0.02) or 0.02)
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    experts = _expert_weights(model) if quantize != "none" else set()
    fresh: dict[int, nn.Parameter] = {}
    for mod in model.module.modules():
        for name, p in list(mod._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) not in fresh:  # a tied weight gets the tensor of its first use
                if id(p) in experts:
                    w = _random(p, name, std, gen, torch.bfloat16 if quantize == "int4"
                                else torch.float32, device)
                    fresh[id(p)] = nn.Parameter(quantize_weight(w, quantize), requires_grad=False)
                    del w
                else:
                    fresh[id(p)] = nn.Parameter(_random(p, name, std, gen, torch.float32,
                                                        device), requires_grad=p.requires_grad)
            mod._parameters[name] = fresh[id(p)]
    model.rebind_parameters(fresh)
    _rebuild_buffers(model, device)
    release_freed_memory()
    model.info["weights"] = f"random (seed {seed}), experts stored {quantize}"
    return model
