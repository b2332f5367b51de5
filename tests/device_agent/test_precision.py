"""Frozen weights stored in bf16/fp16 for a round: what is lowered, and the exact way back."""

import pytest
import torch
from torch import nn

from device_agent.train import RoundContext, train_round
from hfedmoe.errors import ModelError
from hfedmoe.precision import LowPrecisionFrozen, _join_bf16, _split_bf16, lowerable
from hfedmoe.strategies import get_strategy
from tests.device_agent.test_train import text_data, tiny


def test_split_is_bit_exact_and_rounds_to_nearest():
    g = torch.Generator().manual_seed(0)
    w = torch.cat([torch.randn(10_000, generator=g) * 10.0 ** torch.randint(-30, 30, (10_000,),
                                                                           generator=g),
                   torch.tensor([0.0, -0.0, 1.0, -1.0, 3.4e38, -3.4e38, 1e-45, -1e-45])])
    # finite values (exponent not all ones) whose dropped half is exactly 0x8000: ties
    ties = (torch.randint(0, 0x7F00, (100,), generator=g, dtype=torch.int32) << 16) | 0x8000
    w = torch.cat([w, ties.view(torch.float32), (-ties.view(torch.float32))])
    hi, lo = _split_bf16(w)
    assert hi.dtype == torch.bfloat16 and lo.dtype == torch.int16
    assert torch.equal(_join_bf16(hi, lo).view(torch.int32), w.view(torch.int32))
    # the bf16 half is the nearest bf16 value (ties away from zero)
    nearest = w.to(torch.bfloat16).float()
    err, best = (hi.float() - w).abs(), (nearest - w).abs()
    assert torch.equal(err, best)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        self.norm = nn.LayerNorm(8)
        self.tied = nn.Linear(8, 10, bias=False)
        self.tied.weight = self.emb.weight


def test_lowers_frozen_matmul_weights_only_and_restores_them():
    net = Net()
    net.requires_grad_(False)
    net.proj.weight.requires_grad_(True)  # trainable: stays fp32
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert [id(p) for p in lowerable(net)] == [id(net.head.weight)]
    with LowPrecisionFrozen(net, torch.bfloat16) as low:
        assert low.lowered == 1
        assert net.head.weight.dtype == torch.bfloat16
        assert net.emb.weight.dtype == net.proj.weight.dtype == torch.float32
        assert net.head.bias.dtype == net.norm.weight.dtype == torch.float32
        x = torch.randn(4, 8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = net.head(net.proj(x))
        assert y.dtype == torch.bfloat16
    for k, v in net.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k


def test_restore_only_some_and_fp16_keeps_the_original():
    net = Net()
    net.requires_grad_(False)
    low = LowPrecisionFrozen(net, torch.float16)
    assert low.lower() == 2  # proj and head; the tied embedding table stays
    assert low.restore(only=[net.proj.weight]) == 1
    assert net.proj.weight.dtype == torch.float32 and net.head.weight.dtype == torch.float16
    low.restore()
    assert net.head.weight.dtype == torch.float32
    with pytest.raises(ModelError, match="bf16 or fp16"):
        LowPrecisionFrozen(net, torch.float32)


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_bf16_round_trains_fp32_masters_and_leaves_the_model_bit_identical(tokenizer, adapter):
    from hfedmoe.config import TrainConfig

    model = tiny(tokenizer)
    before = {k: v.clone() for k, v in model.state().items()}
    seen = []

    def on_step(_facts):  # inside the round: frozen weights are bf16, trained ones fp32
        dtypes = {p.dtype for p in model.module.parameters()}
        trained = {p.dtype for p in model.trainable_parameters().values()}
        seen.append((dtypes, trained))

    res = train_round(RoundContext(
        model, text_data(), strategy=get_strategy("hfedmoe"), budget=2,
        train=TrainConfig(batch_size=4, dtype="bfloat16", max_steps=2, lr=1e-2,
                          adapter=adapter, hold_frozen_lowp=True),
        on_step=on_step))
    assert res.steps == 2 and res.update.updated
    assert res.update.meta["frozen_dtype"] == "bfloat16"
    assert all(torch.bfloat16 in dtypes and trained == {torch.float32}
               for dtypes, trained in seen)
    assert all(d.dtype == torch.float32 and torch.isfinite(d).all()
               for d in res.update.deltas.values())
    after = model.state()
    changed = {k for k in before if not torch.equal(after[k], before[k])}
    assert all(after[k].dtype == torch.float32 for k in after)
    # every weight no update carries is back to the bit; the trained ones moved
    assert changed and changed <= set(res.update.deltas)


def test_by_default_a_bf16_round_casts_per_use_and_keeps_weights_fp32(tokenizer):
    from hfedmoe.config import TrainConfig

    model = tiny(tokenizer)
    seen = []
    res = train_round(RoundContext(
        model, text_data(), strategy=get_strategy("hfedmoe"), budget=2,
        train=TrainConfig(batch_size=4, dtype="bfloat16", max_steps=2),
        on_step=lambda _f: seen.append({p.dtype for p in model.module.parameters()})))
    assert res.steps == 2 and seen == [{torch.float32}] * 2
    assert res.update.meta["frozen_dtype"] == "float32"
