"""Training attention in bf16 on a CPU runs scaled-dot-product attention in fp32."""

import torch
import torch.nn.functional as F
from torch.testing import assert_close

from hfedmoe.config import ModelConfig
from hfedmoe.models.attention import NAME
from hfedmoe.models.registry import build_model


def _spy_sdpa(monkeypatch) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    real = F.scaled_dot_product_attention

    def spy(q, *args, **kwargs):
        seen.append(q.dtype)
        return real(q, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return seen


def test_built_models_use_fp32_attention_under_bf16_autocast(monkeypatch):
    model = build_model(ModelConfig(name="qwen3-moe-tiny"), "classification", 3)
    configs = {id(s.config): s.config for s in model.module.modules()
               if getattr(s, "config", None) is not None}
    assert {c._attn_implementation for c in configs.values()} == {NAME}
    seen = _spy_sdpa(monkeypatch)
    torch.manual_seed(0)
    ids = torch.randint(5, 100, (2, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.tensor([0, 2])}
    ref = model.module(**batch).logits  # fp32
    assert seen and set(seen) == {torch.float32}
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.module(**batch)
    out.loss.backward()
    assert seen and set(seen) == {torch.float32}  # bf16 q/k/v were cast up
    assert_close(out.logits.float(), ref, rtol=5e-2, atol=5e-2)
