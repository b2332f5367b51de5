"""The offline byte-level tokenizer of the random-init models, and models without one."""

import pytest
import torch

from hfedmoe.config import ModelConfig
from hfedmoe.data import PairDataset, collate
from hfedmoe.errors import ModelError
from hfedmoe.models.hf import FAMILIES, build_config, load_hf_checkpoint
from hfedmoe.models.registry import build_model
from hfedmoe.models.tokenizer import BOS_ID, BYTE_VOCAB_SIZE, EOS_ID, PAD_ID, byte_tokenizer

PAIRS = PairDataset(("Héllo?", "What is 2+2"), ("Hi — there.", "4"), (0, 1), ("a", "b"))


def test_every_byte_is_one_token_and_text_round_trips():
    tok = byte_tokenizer()
    text = "naïve café 🙂 <b>"
    ids = tok(text)["input_ids"]
    assert ids[0] == BOS_ID and len(ids) == 1 + len(text.encode("utf-8"))
    assert ids[1:] == [3 + b for b in text.encode("utf-8")]
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert len(tok) == BYTE_VOCAB_SIZE == 259


def test_two_builds_tokenize_alike():
    texts = ["the same text", "x" * 40]
    assert byte_tokenizer()(texts)["input_ids"] == byte_tokenizer()(texts)["input_ids"]


def test_tiny_models_bring_the_tokenizer_and_a_vocabulary_sized_to_it():
    model = build_model(ModelConfig(name="qwen3-moe-tiny", max_length=32), "causal-lm")
    emb = model.module.get_input_embeddings().weight
    assert emb.shape[0] == len(model.require_tokenizer()) == BYTE_VOCAB_SIZE
    batch = collate(PAIRS, [0, 1], model.tokenizer, 32)
    assert batch["input_ids"][0, 0] == BOS_ID
    # response-only loss: the labels start after "<bos>Héllo?" (1 + 7 bytes)
    assert (batch["labels"][0, :8] == -100).all() and batch["labels"][0, 8] == 3 + ord("H")
    with torch.no_grad():
        assert torch.isfinite(model.module(**batch).loss)


def test_a_model_without_a_tokenizer_says_so(tmp_path):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(build_config(FAMILIES["qwen3-moe"])).save_pretrained(
        tmp_path)  # weights and config, no tokenizer files
    loaded = load_hf_checkpoint(tmp_path, "causal-lm")
    assert loaded.tokenizer is None
    with pytest.raises(ModelError, match="has no tokenizer \\(none of tokenizer.json.*save_pretrained"):
        loaded.require_tokenizer()
    with pytest.raises(ModelError, match="no tokenizer"):
        collate(PAIRS, [0], loaded.tokenizer, 32)


def test_a_local_checkpoint_with_its_tokenizer_is_a_causal_lm_of_the_kit(tmp_path):
    from transformers import AutoModelForCausalLM

    from hfedmoe.generation import greedy_generate

    cfg = build_config(FAMILIES["qwen2-moe"], vocab_size=BYTE_VOCAB_SIZE)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    model = build_model(ModelConfig(name=str(tmp_path), max_length=32,
                                    lora_targets=("q_proj",)), "causal-lm")
    tok = model.require_tokenizer()
    assert tok("ab")["input_ids"] == [BOS_ID, 3 + ord("a"), 3 + ord("b")]
    assert model.info["source"] == str(tmp_path)
    assert any(".shared_expert." in k for k in model.lora_bases)  # a LoRA base like the tiny one
    batch = collate(PAIRS, [0, 1], tok, 32)
    with torch.no_grad():
        assert torch.isfinite(model.module(**batch).loss)
    assert len(greedy_generate(model, list(PAIRS.prompts), 32, max_new_tokens=4)) == 2
