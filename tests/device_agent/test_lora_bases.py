"""LoRA beyond the selected experts: a model's shared experts and targeted attention
projections carry factors in a LoRA round; their base weights never travel and hold no
optimizer state, and the server merges the exact products."""

from __future__ import annotations

import pytest
import torch

from device_agent.train import RoundContext, RoundIds, train_round
from hfedmoe.aggregation import PLAIN_RULE
from hfedmoe.aggregator import Aggregator
from hfedmoe.config import MethodConfig, ModelConfig, TrainConfig
from hfedmoe.data import PairDataset, collate
from hfedmoe.errors import ModelError
from hfedmoe.lora import LORA_A, LORA_B, LoRASpec, expand, with_factors
from hfedmoe.models.registry import build_model
from hfedmoe.names import ExpertId, parse_key
from hfedmoe.strategies import get_strategy
from hfedmoe.trainer import EagerTrainer
from hfedmoe.wire import decode, encode, spec_from_state

LORA_CFG = TrainConfig(batch_size=2, lr=1e-2, adapter="lora", lora_rank=2, lora_alpha=4.0)
LORA = LoRASpec(2, 4.0)
DATA = PairDataset(("Hi", "What is AI?", "Hello", "Tell me a joke"),
                   ("Hello there.", "A field of study.", "Hi.", "No."), (0, 1, 0, 1), ("a", "b"))


def qwen2(targets=("attention",)):
    """The tiny Qwen2-MoE (one shared expert per layer) with LoRA on its attention too."""
    return build_model(ModelConfig(name="qwen2-moe-tiny", max_length=48, lora_targets=targets),
                       "causal-lm")


def _round(model, cfg=LORA_CFG, client="c1"):
    return train_round(RoundContext(model, DATA, strategy=get_strategy("hfedmoe"), budget=2,
                                    train=cfg, ids=RoundIds(client_id=client), max_length=48))


def test_the_shared_experts_and_attention_are_lora_bases():
    model = qwen2()
    bases = set(model.lora_bases)
    shared_experts = {k for k in bases if ".shared_expert." in k}
    attention = {k for k in bases if ".self_attn." in k}
    assert len(shared_experts) == 2 * 3 and len(attention) == 2 * 4  # 2 layers
    assert bases == shared_experts | attention
    assert model.lora_only == attention
    # the shared expert's (1, d) scalar gate is genuinely small: not a base
    assert "shared.model.layers.0.mlp.shared_expert_gate.weight" in model.keys()
    assert "shared.model.layers.0.mlp.shared_expert_gate.weight" not in bases


def test_a_lora_round_sends_factors_never_a_base_weight():
    model = qwen2()
    before = model.state()
    res = _round(model)
    keys = set(res.update.deltas)
    assert res.steps > 0
    base_weights = set(model.lora_bases) | {k for k in model.keys()
                                            if parse_key(k).param in ("w_in", "w_out")}
    assert not keys & base_weights  # no shared-expert, attention or expert base weight
    for base in model.lora_bases:  # every base sends both factors, of the configured rank
        a, b = res.update.deltas[f"{base}.{LORA_A}"], res.update.deltas[f"{base}.{LORA_B}"]
        out_f, in_f = before[base].shape
        assert a.shape == (2, in_f) and b.shape == (out_f, 2) and b.abs().max() > 0
    dense = {k for k in keys if k.rsplit(".", 1)[-1] not in (LORA_A, LORA_B)}
    assert {parse_key(k).kind for k in dense} <= {"gate", "shared"}
    assert {k for k in dense if parse_key(k).kind == "shared"} == {
        f"shared.model.layers.{i}.mlp.shared_expert_gate.weight" for i in (0, 1)}
    after = model.state()  # the device keeps every base weight; no hook is left behind
    assert all(torch.equal(before[k], after[k]) for k in base_weights)
    assert all(not m._forward_hooks for m in model.lora_bases.values())


def test_no_base_weight_holds_optimizer_state():
    model = qwen2()
    experts = [ExpertId(0, 1), ExpertId(1, 2)]
    trainer = EagerTrainer(model, experts, LORA_CFG, MethodConfig())
    trainer.step(collate(DATA, [0, 1], model.tokenizer, 48))
    in_groups = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    with_state = {id(p) for p in trainer.optimizer.state}
    factors = {id(t) for t in trainer.factor_tensors().values()}
    gates = {id(model.parameter(k)) for k in model.keys() if parse_key(k).kind == "gate"}
    small = {id(model.parameter(f"shared.model.layers.{i}.mlp.shared_expert_gate.weight"))
             for i in (0, 1)}
    assert in_groups == factors | gates | small
    assert with_state <= in_groups and factors <= with_state
    base = {id(p) for p in model.module.parameters()} - gates - small
    assert not (in_groups | with_state) & base  # embeddings, attention, experts, lm_head...
    assert len(factors) == 2 * (2 * 2 + len(model.lora_bases))  # A, B of w_in, w_out, bases
    trainer.deltas()
    assert all(not m._forward_hooks for m in model.lora_bases.values())


def test_the_server_merges_the_products_into_the_base_weights():
    model = qwen2()
    state = model.state()
    spec = with_factors(spec_from_state(state), LORA, model.lora_bases)
    ups = [expand(decode(encode(_round(model, client=c).update, 0.0), spec), LORA)
           for c in ("c1", "c2")]
    q = "shared.model.layers.0.self_attn.q_proj.weight"
    assert all(q in u.deltas and u.deltas[q].shape == state[q].shape for u in ups)
    agg = Aggregator(PLAIN_RULE)
    for u in ups:
        agg.add(u)
    new = agg.finalize(state)
    weights = [u.num_examples for u in ups]
    expected = state[q] + sum(w * u.deltas[q] for w, u in zip(weights, ups, strict=True)) / sum(weights)
    torch.testing.assert_close(new[q], expected)


def test_a_full_round_keeps_attention_targets_frozen():
    model = qwen2()
    res = _round(model, cfg=TrainConfig(batch_size=2, lr=1e-2))
    keys = set(res.update.deltas)
    assert not keys & model.lora_only  # attention targets never train in full
    assert "shared.model.layers.0.mlp.shared_expert.up_proj.weight" in keys  # asked: full


def test_a_lora_target_that_does_not_exist_is_named():
    with pytest.raises(ModelError, match=r"model.lora_targets: 'qkv_proj' matches no linear "
                                         r"layer of qwen3-moe.*k_proj, o_proj, q_proj, v_proj"):
        build_model(ModelConfig(name="qwen3-moe-tiny", lora_targets=("qkv_proj",)), "causal-lm")
    one = build_model(ModelConfig(name="qwen3-moe-tiny", lora_targets=("v_proj",)), "causal-lm")
    assert sorted(one.lora_bases) == [f"shared.model.layers.{i}.self_attn.v_proj.weight"
                                      for i in (0, 1)]


def test_quantized_bases_train_factors_and_reload_the_global_weights():
    pytest.importorskip("torchao")
    from hfedmoe.models.quantize import quantize_model
    from hfedmoe.quantize import dequantize_weight, is_quantized

    model = qwen2()
    state = model.state()
    quantize_model(model, "int8")
    q = "shared.model.layers.0.self_attn.q_proj.weight"
    up = "shared.model.layers.0.mlp.shared_expert.up_proj.weight"
    assert is_quantized(model.parameter(q)) and is_quantized(model.parameter(up))
    assert model.module.get_submodule("model.layers.0.self_attn.q_proj").weight is \
        model.parameter(q)
    res = _round(model)
    assert f"{q}.{LORA_B}" in res.update.deltas and q not in res.update.deltas
    new = {**state, q: state[q] + 0.5}  # the next global model: the base is re-quantized
    model.load_state(new)
    assert is_quantized(model.parameter(q))
    layer = model.module.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.weight is model.parameter(q)
    torch.testing.assert_close(dequantize_weight(layer.weight), new[q], atol=0.05, rtol=0)


def test_the_executorch_runtime_refuses_lora_bases():
    from hfedmoe.data import TextDataset
    from hfedmoe.errors import ConfigError

    model = build_model(ModelConfig(name="qwen2-moe-tiny", max_length=16), "classification", 2)
    texts = TextDataset(("a b", "c d", "e f", "g h"), (0, 1, 0, 1), ("x", "y"))
    with pytest.raises(ConfigError, match="LoRA bases.*use the eager runtime"):
        train_round(RoundContext(model, texts, strategy=get_strategy("hfedmoe"), budget=2,
                                 train=LORA_CFG, max_length=16, runtime="executorch"))
