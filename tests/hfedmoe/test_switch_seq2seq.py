"""Switch Transformers as text-to-text (``task="seq2seq"``): the model view holds the experts of
the encoder and of the decoder, trains a chosen subset of both, and plans switch-base-64 from
its ``config.json``. (Rounds stay causal-lm or classification: docs/models.md says why.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import SwitchTransformersForConditionalGeneration

from benchmarks.plan import EXAMPLES_DIR
from hfedmoe.errors import ModelError
from hfedmoe.models.hf import FAMILIES, build_config, build_hf_model, load_hf_checkpoint
from hfedmoe.models.plan import build_meta_model, plan_model
from hfedmoe.names import ExpertId, parse_key


def seq2seq_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 500, (3, 11), generator=g)  # encoder: the prompt
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    labels = torch.randint(2, 500, (3, 6), generator=g)  # decoder: the response
    labels[0, 4:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_the_view_holds_encoder_then_decoder_experts() -> None:
    model = build_hf_model("switch", "seq2seq")
    cfg = model.module.config
    assert model.task == "seq2seq"
    assert isinstance(model.module, SwitchTransformersForConditionalGeneration)
    paths = [layer.path for layer in model.layers]
    assert paths == [f"encoder.block.{i}.layer.1.mlp" for i in range(cfg.num_layers)] + \
        [f"decoder.block.{i}.layer.2.mlp" for i in range(cfg.num_decoder_layers)]
    assert all(layer.top_k == 1 for layer in model.layers)


def test_a_step_trains_only_the_chosen_encoder_and_decoder_experts() -> None:
    model = build_hf_model("switch", "seq2seq")
    decoder_first = model.module.config.num_layers
    chosen = [ExpertId(0, 1), ExpertId(decoder_first + 1, 2)]
    model.set_trainable(chosen, gates=False, shared=False)
    before = model.state()
    opt = torch.optim.AdamW(model.trainable_parameters().values(), lr=1e-2)
    out = model.module(**seq2seq_batch())
    out.loss.backward()
    opt.step()
    after = model.state()
    changed = {parse_key(k).expert for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(chosen)


def test_causal_lm_of_an_encoder_decoder_checkpoint_is_refused(tmp_path: Path) -> None:
    cfg = build_config(FAMILIES["switch"])
    SwitchTransformersForConditionalGeneration(cfg).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="encoder-decoder"):
        load_hf_checkpoint(tmp_path, "causal-lm")
    model = load_hf_checkpoint(tmp_path, "seq2seq")
    assert model.num_layers == cfg.num_layers + cfg.num_decoder_layers


def test_switch_base_64_plans_experts_of_encoder_and_decoder() -> None:
    model = build_meta_model(EXAMPLES_DIR / "switch-base-64")  # the language model: seq2seq
    plan = plan_model(model)
    d, f, e, vocab = 768, 3072, 64, 32128
    assert plan["task"] == "seq2seq" and plan["layers"] == 24
    assert [layer.path for layer in model.layers] == \
        [f"encoder.block.{i}.layer.1.mlp" for i in range(1, 12, 2)] + \
        [f"decoder.block.{i}.layer.2.mlp" for i in range(1, 12, 2)]  # sparse step 2
    assert set(plan["experts_per_layer"]) == {e} and set(plan["top_k"]) == {1}
    assert plan["params_per_expert"][0] == 2 * d * f
    assert plan["expert_params"] == 12 * e * 2 * d * f
    dense_ffn, router, attn = 2 * d * f, e * d, 4 * d * d
    encoder = 12 * attn + (12 * 2 + 1) * d + 32 * 12 + 6 * dense_ffn + 6 * router
    decoder = 12 * 2 * attn + (12 * 3 + 1) * d + 32 * 12 + 6 * dense_ffn + 6 * router
    embeddings = vocab * d  # shared by encoder, decoder and the tied output layer
    assert plan["total_params"] == plan["expert_params"] + encoder + decoder + embeddings
    encoder_only = build_meta_model(EXAMPLES_DIR / "switch-base-64", "classification")
    assert encoder_only.num_layers == 6  # the classifier keeps the encoder's experts
