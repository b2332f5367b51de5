"""Every transformers MoE family through the generic ``use_experts_implementation`` adapter.

Each family: a tiny random config (hidden 32, 2 layers, 4 experts, top-2), the family's own
model with its eager experts as the reference, then the converted model must give the same
logits (every expert path, ``dense`` included), capture its routing, and train exactly a
2-expert subset plus gates and shared parts.
"""

import copy
import os
from functools import cache

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hfedmoe.errors import ModelError  # noqa: E402
from hfedmoe.models.generic import (  # noqa: E402
    FamilyExpert,
    InterfaceExperts,
    bank_from_interface,
    interface_model_types,
    is_interface_experts,
)
from hfedmoe.models.hf import (  # noqa: E402
    family_for_model_type,
    family_path,
    interface_family,
    load_hf_checkpoint,
    unknown_model_type,
    wrap_hf,
)
from hfedmoe.names import ExpertId, parse_key  # noqa: E402

BASE = dict(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, intermediate_size=64, moe_intermediate_size=48,
            max_position_embeddings=256, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, tie_word_embeddings=False, num_experts=4, num_local_experts=4,
            n_routed_experts=4, first_k_dense_replace=0, n_group=1, topk_group=1,
            n_shared_experts=1, shared_expert_intermediate_size=64, decoder_sparse_step=1,
            mlp_only_layers=[], moe_layer_freq=1, expert_interval=1)
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
           qk_nope_head_dim=8, v_head_dim=8, head_dim=None)

# model_type -> extra config kwargs. The first five also have hand adapters (hf.FAMILIES);
# here they go through the generic adapter too.
FAMILIES = {
    "qwen2_moe": {}, "qwen3_moe": {}, "olmoe": {}, "mixtral": {}, "deepseek_v3": MLA,
    "gpt_oss": {},  # interleaved, transposed, biased, custom clamped SwiGLU
    "granitemoe": {}, "granitemoeshared": {}, "deepseek_v2": MLA, "phimoe": {},
    "glm4_moe": {}, "dots1": {}, "ernie4_5_moe": {}, "hunyuan_v1_moe": {}, "minimax_m2": {},
    "flex_olmo": {}, "exaone_moe": {}, "solar_open": {}, "afmoe": {}, "cohere2_moe": {},
    "laguna": {}, "mellum": {}, "minimax": {}, "hy_v3": {}, "flint": {}, "jamba": {},
    "nemotron_h": {},  # has_gate=False, relu2 experts (the family's own activation)
    "lfm2_moe": dict(layer_types=["full_attention", "full_attention"], num_dense_layers=0),
}


@cache
def reference(model_type: str):
    """(config, the family's model with eager experts) — copied by every test."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if unknown_model_type(model_type):  # a family of a later transformers (Python 3.10: 5.20)
        pytest.skip(unknown_model_type(model_type))
    torch.manual_seed(0)
    cfg = CONFIG_MAPPING[model_type](**{**BASE, **FAMILIES[model_type]})
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation="eager").eval()
    with torch.no_grad():  # random routers give near-uniform routing; spread it out
        for name, p in model.named_parameters():
            if p.dim() == 2 and p.shape[0] == 4 and "experts" not in name:
                p.mul_(20.0)
    return cfg, model


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 500, (2, 12), generator=g)
    return {"input_ids": ids, "use_cache": False}


def converted(model_type: str, impl: str = "eager"):
    _, model = reference(model_type)
    return wrap_hf(copy.deepcopy(model), interface_family(model_type), "causal-lm", impl)


def expected_logits(model_type: str) -> torch.Tensor:
    _, model = reference(model_type)
    with torch.no_grad():
        return model(**inputs()).logits


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_converted_model_gives_the_family_outputs(model_type):
    expected = expected_logits(model_type)
    model = converted(model_type)
    assert all(isinstance(m, InterfaceExperts) for m in model.module.modules()
               if hasattr(m, "bank")) and model.num_layers >= 1
    assert model.info["adapter"].startswith("interface")
    for impl in ("eager", "sorted", "grouped", "dense", "capacity"):
        # "capacity" at factor E: every expert has room for every token
        model.set_expert_impl(impl, capacity_factor=float(model.layers[0].num_experts))
        with torch.no_grad():
            got = model.module(**inputs()).logits
        diff = (got - expected).abs().max().item()
        assert diff < 1e-4, f"{model_type} {impl}: max abs diff {diff}"
    for layer in model.layers:
        assert layer.num_experts == 4 and layer.top_k == 2
        assert layer.bank.shape.d_model == 32


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_capture_and_a_two_expert_training_step(model_type):
    model = converted(model_type, "sorted")
    b = inputs()
    with model.capture() as cap:
        with torch.no_grad():
            model.module(**b)
    tokens = b["input_ids"].numel()
    assert sorted(cap.scores) == list(range(model.num_layers))
    for layer in model.layers:
        g, routed = cap.scores[layer.layer_idx], cap.routed[layer.layer_idx]
        assert g.shape == (tokens, 4) and routed.shape == (tokens, 2)
        torch.testing.assert_close(g.sum(-1), torch.ones(tokens))
    # the two experts of the last MoE layer that got the most tokens
    last = model.layers[-1].layer_idx
    busiest = torch.bincount(cap.routed[last].reshape(-1), minlength=4).topk(2).indices
    chosen = {ExpertId(last, int(e)) for e in busiest}
    model.set_trainable(chosen)
    trainable = {id(p) for p in model.trainable_parameters().values()}
    assert all(id(p) in trainable for p in model.module.parameters() if p.requires_grad)
    before = model.state()
    opt = torch.optim.AdamW(model.trainable_parameters().values(), lr=1e-2)
    labels = b["input_ids"].clone()
    loss = model.module(**b, labels=labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    after = model.state()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {parse_key(k).expert for k in changed if parse_key(k).kind == "expert"} == chosen
    assert any(parse_key(k).kind == "gate" for k in changed)
    shared = {k for k in before if parse_key(k).kind == "shared"}
    assert shared <= changed  # shared experts are shared parts: they always train
    with_state = {id(p) for p in opt.state}
    for key, p in model._params.items():
        if parse_key(key).kind == "expert":
            assert (id(p) in with_state) == (parse_key(key).expert in chosen), key


def test_families_with_shared_experts_expose_them_as_shared_parts():
    for model_type in ("qwen2_moe", "deepseek_v2", "glm4_moe"):
        keys = converted(model_type).keys()
        assert any(k.startswith("shared.") and "shared_expert" in k for k in keys), model_type
        assert not any("shared" in k for k in keys if k.startswith("layers.")), model_type


def test_layouts_are_read_from_the_interface_flags():
    gpt = converted("gpt_oss")
    assert isinstance(gpt.layers[0].bank.experts[0], FamilyExpert)  # custom _apply_gate
    assert gpt.layers[0].bank.shape.bias
    nem = converted("nemotron_h")
    assert not nem.layers[0].bank.shape.gated
    assert nem.layers[0].score_fn == "sigmoid"
    assert converted("deepseek_v3").layers[0].score_fn == "sigmoid"
    assert converted("granitemoe").layers[0].score_fn == "softmax"


def test_registry_says_which_path_a_family_takes():
    assert family_path("qwen2_moe") == "hand"
    assert family_path("gpt_oss") == "interface"
    assert family_path("llama") == "unsupported"
    types = interface_model_types()
    assert len(types) >= 40 and {"gpt_oss", "granitemoe", "deepseek_v2"} <= set(types)


def test_a_saved_checkpoint_of_an_interface_family_loads(tmp_path):
    _, model = reference("granitemoe")
    model.save_pretrained(tmp_path)
    loaded = load_hf_checkpoint(tmp_path, "causal-lm")
    assert loaded.family == "granitemoe" and loaded.num_layers == 2
    with torch.no_grad():
        got = loaded.module(**inputs()).logits
    assert (got - expected_logits("granitemoe")).abs().max().item() < 1e-4
    cls = load_hf_checkpoint(tmp_path, "classification", num_labels=3)
    assert "shared.classifier.weight" in cls.keys()


def test_unsupported_families_fail_with_a_model_error(tmp_path):
    from transformers import LlamaConfig

    from hfedmoe.models.plan import build_meta_model

    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                intermediate_size=64, vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="unsupported model_type 'llama'"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "no_such_moe"}')  # e.g. flint on 5.20
    for load in (load_hf_checkpoint, build_meta_model):
        with pytest.raises(ModelError, match="'no_such_moe' is unknown to the installed trans"):
            load(tmp_path)
    assert family_path("no_such_moe") == "unsupported"
    with pytest.raises(ModelError, match="'no_such_moe' is unknown to the installed trans"):
        family_for_model_type("no_such_moe")
    _, model = reference("granitemoe")
    experts = copy.deepcopy(next(m for m in model.modules() if is_interface_experts(m)))
    experts.has_post_expert_norm = True
    with pytest.raises(ModelError, match="has_post_expert_norm"):
        bank_from_interface(experts)
    experts.has_post_expert_norm = False
    del experts.down_proj
    experts.down_proj = torch.zeros(3)
    with pytest.raises(ModelError, match="down_proj"):
        bank_from_interface(experts)
