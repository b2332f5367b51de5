"""Attention for training on a CPU in bf16/fp16: scaled-dot-product attention run in fp32.

On this kit's CPUs the fused SDPA kernel is far slower in bf16 than in fp32 for its backward
pass (the default model's [8, 12, 128, 32] heads: 20 ms forward+backward in bf16, 6 ms with the
inputs cast to fp32 and the output cast back; ``benchmarks/kernels.py``). Attention is frozen
in every round, so its precision changes no trained weight's update rule, only the (more exact)
activations it passes on. Everywhere else (fp32, CUDA) this is transformers' own ``sdpa``.

:func:`use_kit_attention` switches a built transformers model that uses ``sdpa`` to it.
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "hfedmoe_sdpa"
_LOW = (torch.bfloat16, torch.float16)


def sdpa_fp32_on_cpu(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, attention_mask: torch.Tensor | None,
                     *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """transformers' ``sdpa_attention_forward``, in fp32 when the inputs are bf16/fp16 on a CPU."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.device.type != "cpu" or query.dtype not in _LOW:
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    dtype = query.dtype
    mask = attention_mask
    if mask is not None and mask.is_floating_point():
        mask = mask.float()
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(),
                                              mask, *args, **kwargs)
    return out.to(dtype), weights


def use_kit_attention(module: torch.nn.Module) -> bool:
    """Route a transformers model's ``sdpa`` attention through :func:`sdpa_fp32_on_cpu`.

    Returns whether it was switched (models on eager or another attention are left alone).
    """
    from transformers import AttentionInterface

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, sdpa_fp32_on_cpu)
    switched = False
    for sub in module.modules():
        config = getattr(sub, "config", None)
        if config is not None and getattr(config, "_attn_implementation", None) == "sdpa":
            config._attn_implementation = NAME
            switched = True
    return switched
