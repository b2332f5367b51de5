"""Random weights for a meta-device model, one tensor at a time (hfedmoe.models.materialize)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hfedmoe.errors import ConfigError
from hfedmoe.models.hf import FAMILIES, build_config
from hfedmoe.models.materialize import materialize
from hfedmoe.models.plan import build_meta_model, weight_bytes_by_dtype
from hfedmoe.models.quantize import quantize_model
from hfedmoe.quantize import is_quantized, weight_bytes, weight_mode


def _meta(tmp_path: Path, family: str = "olmoe") -> object:
    d = tmp_path / family
    d.mkdir(parents=True)
    # widths int4's kernel packs (multiples of its 32-wide groups)
    build_config(FAMILIES[family], hidden_size=64, intermediate_size=64, head_dim=16
                 ).save_pretrained(d)
    return build_meta_model(d)


@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
def test_materialized_model_trains_at_its_planned_size(tmp_path: Path, quantize: str) -> None:
    model = materialize(_meta(tmp_path), quantize, seed=0)
    assert not any(p.is_meta for p in model.module.parameters())
    assert not any(b.is_meta for b in model.module.buffers())  # rotary frequencies rebuilt
    # every canonical key names the tensor the network holds now
    held = {id(p) for p in model.module.parameters()}
    assert all(id(model.parameter(k)) in held for k in model.keys())
    experts = [getattr(e, n) for layer in model.layers for e in layer.bank.experts
               for n in ("w_in", "w_out")]
    if quantize == "none":
        assert not any(is_quantized(w) for w in experts)
    else:
        assert {weight_mode(w) for w in experts} == {quantize}
        assert not any(w.requires_grad for w in experts)
    quantize_model(model, quantize)
    planned = weight_bytes_by_dtype(_meta(tmp_path / "again"))
    buffers = sum(b.numel() * b.element_size() for b in model.module.buffers())
    assert weight_bytes(model.module) - buffers == planned["fp32" if quantize == "none"
                                                           else quantize]
    ids = torch.randint(0, 200, (2, 8))
    out = model.module(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()  # gates and the rest train over the stored base


def test_materialize_is_seeded_and_refuses_a_bad_mode(tmp_path: Path) -> None:
    a = materialize(_meta(tmp_path / "a"), seed=3)
    b = materialize(_meta(tmp_path / "b"), seed=3)
    assert a.state_hash() == b.state_hash()
    with pytest.raises(ConfigError):
        materialize(_meta(tmp_path / "c"), "int2")
