"""LoRA on the round's selected experts (train.adapter = "lora"): what trains, what is sent,
and that the server's aggregate is the exact weighted average of the clients' B @ A."""

from __future__ import annotations

import pytest
import torch

from device_agent.train import RoundContext, RoundIds, train_round
from hfedmoe.aggregation import PLAIN_RULE
from hfedmoe.aggregator import Aggregator
from hfedmoe.config import TrainConfig
from hfedmoe.data import TextDataset
from hfedmoe.errors import ConfigError
from hfedmoe.lora import LORA_A, LORA_B, ExpertFactors, LoRASpec, expand, with_factors
from hfedmoe.names import parse_key
from hfedmoe.strategies import get_strategy
from hfedmoe.wire import decode, encode, spec_from_state
from tests.device_agent.test_train import text_data, tiny

LORA_CFG = TrainConfig(batch_size=2, lr=1e-2, adapter="lora", lora_rank=2, lora_alpha=4.0)
LORA = LoRASpec(2, 4.0)


def _round(model, data, client="c1", cfg=LORA_CFG, budget=2):
    return train_round(RoundContext(
        model, data, strategy=get_strategy("hfedmoe"), budget=budget, train=cfg,
        ids=RoundIds(client_id=client)))


def test_lora_round_sends_factors_of_the_selected_experts_and_keeps_the_base(tokenizer):
    model = tiny(tokenizer)
    before = model.state()
    res = _round(model, text_data())
    assert res.steps > 0 and len(res.selected) == 2 and res.optimizer_experts <= 2
    spec = model.spec()
    expert_keys = [k for k in res.update.deltas if parse_key(k).kind == "expert"]
    assert expert_keys and all(k.rsplit(".", 1)[-1] in (LORA_A, LORA_B) for k in expert_keys)
    assert {parse_key(k).expert for k in expert_keys} == set(res.update.updated) \
        <= set(res.selected)
    for k in expert_keys:
        base, part = k.rsplit(".", 1)
        out_f, in_f = spec[base]
        assert tuple(res.update.deltas[k].shape) == ((2, in_f) if part == LORA_A else (out_f, 2))
    assert any(res.update.deltas[k].abs().max() > 0 for k in expert_keys if k.endswith(LORA_B))
    # the device's model keeps its base expert weights and carries no factors afterwards
    after = model.state()
    assert all(torch.equal(before[k], after[k]) for k in before if parse_key(k).kind == "expert")
    assert all(e.factors is None for layer in model.layers for e in layer.bank.experts)
    assert any(not torch.equal(before[k], after[k]) for k in before
               if parse_key(k).kind != "expert")  # gates and the head still train


def test_lora_update_is_a_small_fraction_of_the_full_update(tokenizer):
    full = _round(tiny(tokenizer), text_data(), cfg=TrainConfig(batch_size=2, lr=1e-2))
    lora = _round(tiny(tokenizer), text_data())

    def expert_numel(res):
        return sum(t.numel() for k, t in res.update.deltas.items()
                   if parse_key(k).kind == "expert")

    assert len(full.update.updated) == len(lora.update.updated) == 2
    assert expert_numel(lora) < 0.5 * expert_numel(full)


def test_server_aggregate_is_the_exact_average_of_the_products(tokenizer):
    data = text_data()
    halves = [TextDataset(data.texts[i::2], data.labels[i::2], data.label_names) for i in (0, 1)]
    model = tiny(tokenizer)
    global_state = model.state()
    spec = with_factors(spec_from_state(global_state), LORA)
    updates = []
    for i, shard in enumerate(halves):
        model.load_state(global_state)
        res = _round(model, shard, client=f"c{i}", budget=3)
        updates.append(res.update)
    agg = Aggregator(PLAIN_RULE)
    for u in updates:
        agg.add(expand(decode(encode(u, 0.0), spec), LORA))
    new = agg.finalize(global_state)
    # by hand: W + sum_c n_c * scale * B_c A_c / sum_c n_c over the clients that sent W
    checked = 0
    for key in global_state:
        pk = parse_key(key)
        if pk.kind != "expert" or pk.param not in ("w_in", "w_out"):
            continue
        senders = [u for u in updates if f"{key}.{LORA_A}" in u.deltas]
        if not senders:
            assert new[key] is global_state[key]
            continue
        total = sum(u.num_examples for u in senders)
        want = global_state[key] + sum(
            u.num_examples * LORA.scale * (u.deltas[f"{key}.{LORA_B}"] @ u.deltas[f"{key}.{LORA_A}"])
            for u in senders) / total
        torch.testing.assert_close(new[key], want, rtol=1e-5, atol=1e-6)
        checked += 1
    assert checked >= 2


@pytest.mark.parametrize("impl", ["grouped", "sorted", "dense", "capacity"])
def test_every_expert_path_sees_the_factors(tokenizer, impl):
    model = tiny(tokenizer)
    bank = model.layers[0].bank
    bank.capacity_factor = bank.num_experts / 2  # "capacity": E/k, nothing dropped
    gen = torch.Generator().manual_seed(0)
    for e in bank.experts[:2]:
        e.factors = ExpertFactors(e.w_in, e.w_out, LORA, gen)
        for t in e.factors.factors.values():
            with torch.no_grad():
                t.normal_(std=0.1, generator=gen)
    x = torch.randn(7, bank.experts[0].shape.d_model, generator=gen)
    idx = torch.randint(0, len(bank.experts), (7, 2), generator=gen)
    w = torch.rand(7, 2, generator=gen)
    bank.impl = "eager"
    ref = bank(x, idx, w)
    bank.impl = impl
    torch.testing.assert_close(bank(x, idx, w), ref, rtol=1e-4, atol=1e-5)
    for e in bank.experts[:2]:
        e.factors = None
    bank.impl = "eager"
    assert (bank(x, idx, w) - ref).abs().max() > 1e-4  # the factors did change the output


def test_lora_settings_that_cannot_work_are_config_errors(tokenizer):
    with pytest.raises(ConfigError):
        TrainConfig(adapter="lora", reselect="batch")
    with pytest.raises(ConfigError):
        TrainConfig(adapter="qlora")
    with pytest.raises(ConfigError):
        TrainConfig(adapter="lora", lora_rank=0)


def test_lora_cost_model_counts_factors_not_whole_experts(tokenizer):
    from device_agent.budget import Limits, compute_budget
    from device_agent.costs import measure_costs

    model = tiny(tokenizer)
    before = model.state()
    full = measure_costs(model, 2, 16, repeats=1)
    lora = measure_costs(model, 2, 16, repeats=1, adapter="lora", lora=LORA)
    assert (full.adapter, lora.adapter, lora.lora_rank) == ("full", "lora", 2)
    shape = model.layers[0].bank.shape
    d_in = shape.d_ff * (2 if shape.gated else 1)
    n_lora = 2 * (d_in + shape.d_model) + 2 * (shape.d_model + shape.d_ff)
    # AdamW: grads + 2 moments of the factors only; the factors are held, no base-weight copy
    assert lora.cost.expert_state_bytes == 3 * 4 * n_lora
    assert lora.cost.expert_grad_bytes == 4 * n_lora == lora.cost.expert_snapshot_bytes
    assert full.cost.expert_state_bytes == 3 * 4 * shape.params_per_expert
    assert lora.cost.expert_activation_bytes > full.cost.expert_activation_bytes  # rank-r rows
    assert lora.cost.per_trained_expert_bytes < full.cost.per_trained_expert_bytes
    # the measurement leaves the model as it was: no factors, same weights
    assert all(e.factors is None for layer in model.layers for e in layer.bank.experts)
    after = model.state()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the same memory quota admits more LoRA experts than whole experts
    quota = full.cost.peak_bytes(3) - full.cost.resident_bytes
    budgets = [compute_budget(m.cost, Limits(available_bytes=10**12, deadline_seconds=1e6,
                                              steps_per_round=1, margin_fraction=0.0,
                                              training_quota_bytes=quota)).c_budget
               for m in (full, lora)]
    assert budgets[0] == 3 and budgets[1] > 3, budgets


def test_bad_adapter_for_the_cost_model_is_a_device_error(tokenizer):
    from device_agent.costs import measure_costs
    from hfedmoe.errors import DeviceError

    with pytest.raises(DeviceError, match="adapter"):
        measure_costs(tiny(tokenizer), 2, 16, repeats=1, adapter="qlora")
