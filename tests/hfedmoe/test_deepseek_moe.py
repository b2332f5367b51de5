"""DeepSeekMoE (model_type "deepseek") through the kit equals DeepSeekMoE's own code.

A DeepSeekMoE checkpoint (its ``config.json`` and a ``model.safetensors`` in DeepSeekMoE's
parameter names) is written from the reference implementation
(:mod:`tests.hfedmoe.deepseek_reference`, after ``modeling_deepseek.py``) with random weights,
loaded by the kit like any checkpoint directory, and compared: the MoE block, every decoder
layer's output, the logits, and the gradients of a training step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch.testing import assert_close

from benchmarks.plan import EXAMPLES_DIR
from hfedmoe.errors import ModelError
from hfedmoe.models.hf import load_hf_checkpoint
from hfedmoe.models.plan import build_meta_model, plan_model
from hfedmoe.names import ExpertId
from tests.hfedmoe.deepseek_reference import ReferenceDeepseekForCausalLM, reference_config

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=8,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
            n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3,
            first_k_dense_replace=1, moe_layer_freq=1, norm_topk_prob=False,
            scoring_func="softmax", max_position_embeddings=64, rms_norm_eps=1e-6,
            rope_theta=10000, aux_loss_alpha=0.001, seq_aux=True, tie_word_embeddings=False)
# every other layer sparse from layer 0, grouped-query attention
TINY_FREQ2 = {**TINY, "num_hidden_layers": 4, "first_k_dense_replace": 0, "moe_layer_freq": 2,
              "num_key_value_heads": 2}


def deepseek_dir(tmp_path: Path, raw: dict[str, Any], seed: int = 0
                 ) -> tuple[Path, ReferenceDeepseekForCausalLM]:
    """A checkpoint directory as DeepSeekMoE ships it (remote-code config, per-expert names)."""
    torch.manual_seed(seed)
    ref = ReferenceDeepseekForCausalLM(reference_config(raw)).eval()
    d = tmp_path / f"deepseek-{seed}"
    d.mkdir()
    config = {"architectures": ["DeepseekForCausalLM"], "model_type": "deepseek",
              "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekConfig",
                           "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"},
              "bos_token_id": 1, "eos_token_id": 2, "rope_scaling": None, **raw}
    (d / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, d / "model.safetensors")
    return d, ref


def inputs(vocab: int = 96) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # one right-padded row
    return {"input_ids": ids, "attention_mask": mask}


def test_checkpoint_names_are_deepseek_moe_names(tmp_path: Path) -> None:
    _, ref = deepseek_dir(tmp_path, TINY)
    keys = set(ref.state_dict())
    assert {"model.layers.1.mlp.gate.weight", "model.layers.1.mlp.experts.7.gate_proj.weight",
            "model.layers.1.mlp.experts.7.up_proj.weight",
            "model.layers.1.mlp.experts.7.down_proj.weight",
            "model.layers.2.mlp.shared_experts.down_proj.weight",
            "model.layers.0.mlp.gate_proj.weight", "lm_head.weight"} <= keys
    assert not any(k.startswith("model.layers.0.mlp.experts") for k in keys)  # layer 0 dense


@pytest.mark.parametrize("raw", [TINY, TINY_FREQ2], ids=["first-dense", "every-other-gqa"])
def test_logits_and_every_layer_equal_the_reference(tmp_path: Path, raw: dict) -> None:
    d, ref = deepseek_dir(tmp_path, raw)
    model = load_hf_checkpoint(d, "causal-lm")
    b = inputs()
    with torch.no_grad():
        want = ref(**b)
        got = model.module(**b, output_hidden_states=True)
        final = ref.model.norm(want.hidden_states[-1])
    real = b["attention_mask"].bool()  # padded positions are nobody's output
    sparse = [i for i in range(raw["num_hidden_layers"])
              if i >= raw["first_k_dense_replace"] and i % raw["moe_layer_freq"] == 0]
    assert [layer.path for layer in model.layers] == [f"model.layers.{i}.mlp" for i in sparse]
    assert model.layers[0].top_k == raw["num_experts_per_tok"]
    assert model.layers[0].score_fn == "softmax"
    # transformers' hidden_states: the embeddings, then each layer's output, the last one
    # after the final norm
    layer_outputs = got.hidden_states[1:]
    expected = [*want.hidden_states[:-1], final]
    for i, (g, w) in enumerate(zip(layer_outputs, expected, strict=True)):
        assert_close(g[real], w[real], rtol=1e-5, atol=1e-5, msg=f"decoder layer {i}")
    assert_close(got.logits[real], want.logits[real], rtol=1e-5, atol=1e-5)


def test_moe_block_equals_deepseek_moe(tmp_path: Path) -> None:
    """The converted block (kit experts, the family's router and shared MLP) on the same input
    as ``DeepseekMoE.forward``, on every expert path of the kit."""
    d, ref = deepseek_dir(tmp_path, TINY)
    model = load_hf_checkpoint(d, "causal-lm")
    x = torch.randn(2, 9, TINY["hidden_size"], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref.model.layers[1].mlp(x)
        for impl in ("eager", "grouped", "dense"):
            model.set_expert_impl(impl)
            got = model.module.get_submodule(model.layers[0].path)(x)
            assert_close(got, want, rtol=1e-5, atol=1e-6, msg=impl)


def test_training_step_gradients_equal_the_reference(tmp_path: Path) -> None:
    """LM loss and gradients of the routed experts, the router and the shared experts equal
    DeepSeekMoE's training path (aux loss off: the kit trains with the LM loss alone)."""
    raw = {**TINY, "aux_loss_alpha": 0.0}
    d, ref = deepseek_dir(tmp_path, raw)
    model = load_hf_checkpoint(d, "causal-lm")
    model.set_trainable(model.expert_ids(), gates=True, shared=True)
    b = inputs()
    labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    ref.train()
    want = ref(**b, labels=labels)
    want.loss.backward()
    got = model.module(**b, labels=labels)
    got.loss.backward()
    assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    f = raw["moe_intermediate_size"]
    for layer_idx, path in ((0, "model.layers.1.mlp"), (1, "model.layers.2.mlp")):
        block = ref.get_submodule(path)
        for e in (0, 5):
            w_in = model.parameter(f"layers.{layer_idx}.experts.{e}.w_in").grad  # [gate; up]
            w_out = model.parameter(f"layers.{layer_idx}.experts.{e}.w_out").grad
            assert_close(w_in[:f], block.experts[e].gate_proj.weight.grad, atol=1e-6, rtol=1e-4)
            assert_close(w_in[f:], block.experts[e].up_proj.weight.grad, atol=1e-6, rtol=1e-4)
            assert_close(w_out, block.experts[e].down_proj.weight.grad, atol=1e-6, rtol=1e-4)
        assert_close(model.parameter(f"layers.{layer_idx}.gate.weight").grad,
                     block.gate.weight.grad, atol=1e-6, rtol=1e-4)
        shared = model.parameter(f"shared.{path}.shared_experts.down_proj.weight").grad
        assert_close(shared, block.shared_experts.down_proj.weight.grad, atol=1e-6, rtol=1e-4)


def test_gate_capture_is_deepseek_routing(tmp_path: Path) -> None:
    d, ref = deepseek_dir(tmp_path, TINY)
    model = load_hf_checkpoint(d, "causal-lm")
    b = inputs()
    with torch.no_grad(), model.capture(b["attention_mask"]) as cap:
        model.module(**b)
    real = int(b["attention_mask"].sum())
    g = cap.scores[0]
    assert g.shape == (real, TINY["n_routed_experts"])
    top = g.topk(TINY["num_experts_per_tok"], -1).indices.sort(-1).values
    assert torch.equal(cap.routed[0].sort(-1).values, top)
    assert ExpertId(1, 7) in model.expert_ids()


@pytest.mark.parametrize("change,why", [({"norm_topk_prob": True}, "norm_topk_prob"),
                                        ({"n_shared_experts": None}, "n_shared_experts"),
                                        ({"rope_scaling": {"type": "linear", "factor": 2.0}},
                                         "rope_scaling")])
def test_what_the_family_cannot_compute_is_refused(tmp_path: Path, change: dict,
                                                   why: str) -> None:
    d = tmp_path / "odd"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "deepseek", **TINY, **change}))
    with pytest.raises(ModelError, match=why):
        build_meta_model(d)


def test_shipped_deepseek_moe_16b_plans_from_its_config() -> None:
    model = build_meta_model(EXAMPLES_DIR / "deepseek-moe-16b")
    plan = plan_model(model)
    d, f, dense_f = 2048, 1408, 10944
    assert plan["model_type"] == "deepseek" and plan["layers"] == 28
    assert plan["moe_layers"] == 27 and set(plan["experts_per_layer"]) == {64}
    assert set(plan["top_k"]) == {6}
    assert plan["params_per_expert"][0] == 3 * d * f
    assert plan["shared_expert_params"] == 27 * 3 * d * 2 * f
    attention = 4 * d * d
    dense_mlp = 3 * d * dense_f
    embeddings = 2 * 102400 * d  # untied input embedding and lm_head
    norms = d * (2 * 28 + 1)
    routers = 27 * 64 * d
    want = (28 * attention + dense_mlp + 27 * (64 * 3 * d * f + 3 * d * 2 * f) + routers
            + embeddings + norms)
    assert plan["total_params"] == want  # 16.38 B, the published 16.4 B
    assert plan["active_params_per_token"] == want - 27 * 58 * 3 * d * f  # 6 of 64 routed
