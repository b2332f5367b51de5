"""The model layer over every supported family: conversion fidelity, capture, training subsets."""

import copy

import pytest
import torch
from torch.testing import assert_close

from hfedmoe.errors import ModelError
from hfedmoe.models.hf import FAMILIES, build_config, build_hf_model, wrap_hf
from hfedmoe.names import ExpertId, expert_key, parse_key

CASES = [(f, t) for f in FAMILIES for t in ("causal-lm", "classification")
         if FAMILIES[f].causal or t == "classification"]


def batch(task: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 500, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0  # one padded sequence
    labels = ids.clone() if task == "causal-lm" else torch.tensor([0, 1, 2])
    if task == "causal-lm":
        labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("family", [f for f in FAMILIES if FAMILIES[f].causal] + ["switch"])
def test_conversion_keeps_the_family_outputs(family):
    """Fused 3-D experts (and Switch's per-expert modules) become per-expert params exactly."""
    from transformers import AutoModelForCausalLM, SwitchTransformersForConditionalGeneration

    torch.manual_seed(0)
    cfg = build_config(FAMILIES[family])
    if FAMILIES[family].causal:
        original = AutoModelForCausalLM.from_config(cfg).eval()
        inputs = {"input_ids": batch("causal-lm")["input_ids"]}
    else:
        original = SwitchTransformersForConditionalGeneration(cfg).eval()
        ids = batch("causal-lm")["input_ids"]
        inputs = {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
    with torch.no_grad():
        expected = original(**inputs).logits
    for impl in ("eager", "grouped", "dense"):
        converted = wrap_hf(copy.deepcopy(original), FAMILIES[family], "causal-lm", impl)
        with torch.no_grad():
            got = converted.module(**inputs).logits
        assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if not FAMILIES[family].causal:
        assert converted.num_layers == cfg.num_layers + cfg.num_decoder_layers


@pytest.mark.parametrize("family,task", CASES)
def test_two_selected_experts_are_the_only_ones_that_change(family, task):
    model = build_hf_model(family, task, num_labels=3)
    chosen = [ExpertId(1, 0), ExpertId(1, 2)]
    model.set_trainable(chosen, gates=False, shared=False)
    before = model.state()
    opt = torch.optim.AdamW(model.trainable_parameters().values(), lr=1e-2)
    out = model.module(**batch(task))
    out.loss.backward()
    opt.step()
    after = model.state()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    changed_experts = {parse_key(k).expert for k in changed}
    assert changed_experts == set(chosen)
    assert all(parse_key(k).kind == "expert" for k in changed)
    # optimizer state exists only for the chosen experts' parameters
    with_state = {id(p) for p in opt.state}
    for key, p in model._params.items():
        pk = parse_key(key)
        assert (id(p) in with_state) == (pk.kind == "expert" and pk.expert in chosen), key


@pytest.mark.parametrize("family,task", CASES)
def test_capture_gives_gate_scores_of_every_real_token(family, task):
    model = build_hf_model(family, task, num_labels=3)
    b = batch(task)
    with model.capture(b["attention_mask"]) as cap:
        model.module(**b)
    real_tokens = int(b["attention_mask"].sum())
    assert sorted(cap.scores) == list(range(model.num_layers))
    for layer in model.layers:
        g = cap.scores[layer.layer_idx]
        if g.shape[0] != real_tokens:  # Switch decoder layers see decoder tokens
            assert family == "switch"
            continue
        assert g.shape == (real_tokens, layer.num_experts)
        assert_close(g.sum(-1), torch.ones(real_tokens))
        routed = cap.routed[layer.layer_idx]
        assert routed.shape == (real_tokens, layer.top_k)
        if layer.score_fn == "softmax":  # softmax routers route to their top-k scores
            top = g.topk(layer.top_k, -1).indices.sort(-1).values
            assert torch.equal(routed.sort(-1).values, top)


def test_gates_and_shared_parts_train_by_default():
    model = build_hf_model("qwen3-moe", "classification", num_labels=3)
    model.set_trainable([ExpertId(0, 1)])
    names = set(model.trainable_parameters())
    assert names == {expert_key(0, 1, "w_in"), expert_key(0, 1, "w_out"),
                     "layers.0.gate.weight", "layers.1.gate.weight",
                     "shared.classifier.weight", "shared.classifier.bias"}
    non_canonical = [n for n, p in model.module.named_parameters() if p.requires_grad]
    assert len(non_canonical) == len(names)  # nothing outside the canonical view trains


def test_read_write_by_canonical_name():
    model = build_hf_model("mixtral", "causal-lm")
    eid = ExpertId(1, 3)
    state = model.expert_state(eid)
    assert set(state) == {"layers.1.experts.3.w_in", "layers.1.experts.3.w_out"}
    new = {k: torch.full_like(v, 0.5) for k, v in state.items()}
    h0 = model.state_hash()
    model.load_state(new)
    assert all(torch.all(v == 0.5) for v in model.expert_state(eid).values())
    assert model.state_hash() != h0
    assert set(model.gate_state(0)) == {"layers.0.gate.weight"}
    assert model.spec()["layers.0.gate.weight"] == (4, 32)
    with pytest.raises(ModelError, match="shape"):
        model.load_state({"layers.1.experts.3.w_in": torch.zeros(2, 2)})
    with pytest.raises(ModelError, match="no parameter"):
        model.load_state({"layers.9.experts.0.w_in": torch.zeros(2, 2)})
    with pytest.raises(ModelError, match="not a canonical"):
        model.parameter("model.layers.0.mlp.gate.weight")
    with pytest.raises(ModelError, match="out of range"):
        model.set_trainable([ExpertId(0, 7)])


def test_summary_counts_total_and_active_parameters():
    model = build_hf_model("qwen3-moe", "causal-lm")
    s = model.summary()
    per_expert = 2 * 48 * 32 + 32 * 48  # gate_up (2F x d) + down (d x F)
    assert s["params_per_expert"] == [per_expert, per_expert]
    assert s["expert_params"] == 2 * 4 * per_expert
    assert s["total_params"] - s["active_params_per_token"] == 2 * (4 - 2) * per_expert
