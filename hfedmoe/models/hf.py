"""transformers MoE families seen through :class:`~hfedmoe.models.base.MoEModel`.

transformers 5 stores the experts of Qwen2-MoE, Qwen3-MoE, OLMoE, Mixtral and DeepSeek-V3 as
fused 3-D tensors (``gate_up_proj`` (E, 2F, d), ``down_proj`` (E, d, F)) and calls them as
``experts(hidden (T, d), top_k_index (T, k), top_k_weights (T, k))``; Switch Transformers keeps
per-expert ``nn.Linear`` modules called with a one-hot dispatch mask. Both are converted in place
into :class:`~hfedmoe.experts.ExpertBank` (per-expert parameters, same numbers), which is what lets
a budget freeze experts without gradient masks or optimizer state for them. The routers are
left untouched, so routing is exactly the family's own. Shared experts (the blocks' ``*shared*``
children) are shared parts (``shared.*`` keys) and LoRA bases
(:mod:`hfedmoe.models.lora_targets`), as in the generic adapter.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hfedmoe.errors import ModelError
from hfedmoe.experts import ExpertBank, ExpertShape
from hfedmoe.models.base import MoELayer, MoEModel, ScoreFn, decode_topk_router
from hfedmoe.models.lora_targets import add_shared_expert_bases
from hfedmoe.models.minilm import SequenceClassifier


@dataclass(frozen=True)
class Family:
    """How to find and convert the MoE blocks of one transformers model family."""

    name: str
    model_type: str
    config_class: str
    layout: str  # "fused", "switch" (hand adapters) or "interface" (hfedmoe.models.generic)
    score_fn: ScoreFn = "softmax"
    causal: bool = True
    tiny: Callable[[], dict[str, Any]] | None = None  # kwargs of a tiny test config


def _tiny_decoder(**extra: Any) -> Callable[[], dict[str, Any]]:
    def make() -> dict[str, Any]:
        kw = dict(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, intermediate_size=64,
                  max_position_embeddings=256, num_experts_per_tok=2, pad_token_id=0,
                  tie_word_embeddings=False)
        kw.update(extra)
        return kw
    return make


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("qwen2-moe", "qwen2_moe", "Qwen2MoeConfig", "fused",
           tiny=_tiny_decoder(num_experts=4, moe_intermediate_size=48,
                              shared_expert_intermediate_size=64)),
    Family("qwen3-moe", "qwen3_moe", "Qwen3MoeConfig", "fused",
           tiny=_tiny_decoder(num_experts=4, moe_intermediate_size=48)),
    Family("olmoe", "olmoe", "OlmoeConfig", "fused",
           tiny=_tiny_decoder(num_experts=4, intermediate_size=48)),
    Family("mixtral", "mixtral", "MixtralConfig", "fused",
           tiny=_tiny_decoder(num_local_experts=4, intermediate_size=48)),
    Family("deepseek-v3", "deepseek_v3", "DeepseekV3Config", "fused", score_fn="sigmoid",
           tiny=_tiny_decoder(n_routed_experts=4, moe_intermediate_size=48, n_shared_experts=1,
                              n_group=1, topk_group=1, first_k_dense_replace=0, num_key_value_heads=4,
                              kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                              qk_nope_head_dim=8, v_head_dim=8, head_dim=None)),
    # DeepSeekMoE (model_type "deepseek", remote code on the hub) mapped exactly onto
    # transformers' DeepSeek-OCR-2 text decoder; its fused experts go through the generic adapter
    Family("deepseek-moe", "deepseek", "DeepseekMoeConfig", "interface",
           tiny=lambda: deepseek_tiny_config()),
    Family("switch", "switch_transformers", "SwitchTransformersConfig", "switch", causal=False,
           tiny=lambda: dict(vocab_size=512, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                             num_decoder_layers=2, num_heads=4, num_experts=4,
                             encoder_sparse_step=1, decoder_sparse_step=1,
                             decoder_start_token_id=0, pad_token_id=0, expert_capacity=64)),
]}


def deepseek_tiny_config() -> dict[str, Any]:
    from hfedmoe.models.deepseek_moe import tiny_config

    return tiny_config()


def register_converted_families() -> None:
    """Register the model types the kit maps onto a transformers family itself
    (``"deepseek"``: :mod:`hfedmoe.models.deepseek_moe`) with transformers' Auto classes.
    Idempotent; called before any config is read or built."""
    from hfedmoe.models.deepseek_moe import register

    register()


def interface_family(model_type: str, config_class: str = "") -> Family:
    """The generic family of a model_type whose experts use transformers' experts interface."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not config_class:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        config_class = CONFIG_MAPPING_NAMES.get(model_type, "")
    return Family(model_type.replace("_", "-"), model_type, config_class, "interface",
                  causal=model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def unknown_model_type(model_type: str) -> str | None:
    """Why ``model_type`` cannot be used when the installed transformers does not know it at all
    (e.g. a family added after 5.20, the last release for Python 3.10); None when it does."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type in CONFIG_MAPPING_NAMES:
        return None
    why = (f"model_type {model_type!r} is unknown to the installed transformers "
           f"{transformers.__version__} (a later release may add it")
    return why + ("; 5.21+ need Python 3.11)" if sys.version_info < (3, 11) else ")")


def config_error(path: Path, exc: Exception) -> str:
    """Why transformers cannot read ``path``/config.json: its model_type being unknown to this
    transformers when that is the cause, else transformers' own first line."""
    try:
        model_type = json.loads((path / "config.json").read_text(encoding="utf-8"))["model_type"]
    except (OSError, ValueError, TypeError, KeyError):
        model_type = None
    unknown = unknown_model_type(model_type) if isinstance(model_type, str) else None
    return unknown or ("transformers cannot read this config: "
                       f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")


def read_config(path: Path) -> Any:
    """transformers' config of the checkpoint directory ``path`` (offline), or a
    :class:`ModelError` saying why it cannot be read."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    register_converted_families()
    try:
        return AutoConfig.from_pretrained(path)
    except ModelError as exc:  # a config class of the kit refusing it (deepseek_moe)
        raise ModelError(f"{path}: {exc}") from exc
    except (ValueError, KeyError, OSError, TypeError, StrictDataclassError) as exc:
        raise ModelError(f"{path}: {config_error(path, exc)}") from exc


def family_path(model_type: str) -> str:
    """How the kit converts ``model_type``: "hand" (a FAMILIES adapter), "interface" (the
    generic adapter over ``use_experts_implementation``) or "unsupported" (also a model_type the
    installed transformers does not know: :func:`unknown_model_type` says why)."""
    from hfedmoe.models.generic import modeling_uses_interface

    if any(f.model_type == model_type for f in FAMILIES.values()):
        return "hand"
    return "interface" if modeling_uses_interface(model_type) else "unsupported"


def family_for_model_type(model_type: str) -> Family:
    for fam in FAMILIES.values():
        if fam.model_type == model_type:
            return fam
    if family_path(model_type) == "interface":
        return interface_family(model_type)
    unknown = unknown_model_type(model_type)
    if unknown:
        raise ModelError(unknown)
    raise ModelError(f"unsupported model_type {model_type!r}: no hand adapter (those: "
                     f"{sorted(f.model_type for f in FAMILIES.values())}) and its modeling file "
                     "does not use transformers' use_experts_implementation interface")


class SwitchExperts(nn.Module):
    """Switch Transformers' experts call (one-hot dispatch, (T, 1) weights) over a bank."""

    def __init__(self, bank: ExpertBank) -> None:
        super().__init__()
        self.bank = bank

    def forward(self, hidden_states: torch.Tensor, selected_experts: torch.Tensor,
                routing_weights: torch.Tensor) -> torch.Tensor:
        one_hot = selected_experts.reshape(hidden_states.shape[0], -1)  # (T, E)
        idx = one_hot.argmax(-1, keepdim=True)  # (T, 1)
        dropped = one_hot.sum(-1, keepdim=True) == 0  # over expert capacity: no expert
        idx = torch.where(dropped, torch.full_like(idx, -1), idx)
        return self.bank(hidden_states, idx, routing_weights.reshape(-1, 1))


def _decode_switch_router(output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    _, _, logits = output  # (one-hot dispatch, probs of the choice, router logits)
    logits = logits.reshape(-1, logits.shape[-1])
    return logits, logits.argmax(-1, keepdim=True)


def convert_moe_blocks(model: nn.Module, family: Family, impl: str = "grouped",
                       prefix: str = "") -> list[MoELayer]:
    """Swap every MoE block's experts for an :class:`ExpertBank`, in forward order."""
    cfg = model.config
    layers: list[MoELayer] = []
    for path, block in list(model.named_modules()):
        experts = getattr(block, "experts", None)
        if experts is None or isinstance(experts, ExpertBank | SwitchExperts):
            continue
        idx = len(layers)
        full = f"{prefix}{path}"
        if family.layout == "fused" and hasattr(experts, "gate_up_proj"):
            bank = ExpertBank.from_fused(experts.gate_up_proj.data, experts.down_proj.data,
                                         cfg.hidden_act, impl)
            block.experts = bank
            layers.append(MoELayer(idx, full, bank, block.gate, block.gate.top_k,
                                   family.score_fn, decode_topk_router))
        elif family.layout == "switch" and hasattr(block, "router"):
            first = experts["expert_0"]
            shape = ExpertShape(cfg.d_model, cfg.d_ff, cfg.dense_act_fn, gated=False)
            bank = ExpertBank(shape, len(experts), impl)
            with torch.no_grad():
                for e, expert in enumerate(bank.experts):
                    src = experts[f"expert_{e}"]
                    expert.w_in.copy_(src.wi.weight)
                    expert.w_out.copy_(src.wo.weight)
            bank.to(first.wi.weight.dtype)
            block.experts = SwitchExperts(bank)
            layers.append(MoELayer(idx, full, bank, block.router, 1, "softmax",
                                   _decode_switch_router))
    return layers


def build_config(family: Family, **overrides: Any) -> Any:
    from transformers import AutoConfig

    if family.tiny is None:
        raise ModelError(f"{family.name} has no built-in config; give a checkpoint directory")
    register_converted_families()
    kwargs = family.tiny()
    kwargs.update(overrides)
    return AutoConfig.for_model(family.model_type, **kwargs)


def wrap_hf(model: nn.Module, family: Family, task: str, impl: str = "grouped",
            tokenizer: Any = None, info: dict[str, Any] | None = None) -> MoEModel:
    """Convert a transformers model of ``family`` for ``task`` and wrap it."""
    model.eval()  # dropout off: deltas depend only on data and seed
    inner, prefix, shared = model, "", {}
    if isinstance(model, SequenceClassifier):
        inner, prefix, shared = model.backbone, "backbone.", {"classifier": model.classifier}
    if family.layout == "interface":
        from hfedmoe.models.generic import FamilyExpert, convert_interface_blocks

        layers, shared_experts = convert_interface_blocks(inner, impl, prefix, family.name)
        shared = {**shared_experts, **shared}
        info = {"adapter": "interface (use_experts_implementation)", **(info or {})}
        if any(isinstance(layer.bank.experts[0], FamilyExpert) for layer in layers):
            info["expert_activation"] = "the family's own (its _apply_gate / act_fn)"
    else:
        from hfedmoe.models.generic import shared_parts

        layers = convert_moe_blocks(inner, family, impl, prefix=prefix)
        shared_experts = {k: v for layer in layers
                          for k, v in shared_parts(model.get_submodule(layer.path),
                                                   layer.path).items()}
        shared = {**shared_experts, **shared}
    out = MoEModel(model, family.name, task, layers, shared=shared, tokenizer=tokenizer,
                   info=info)
    add_shared_expert_bases(out, shared_experts)  # LoRA rounds adapt them through factors
    return out


def _classifier(cfg: Any, family: Family, num_labels: int, backbone: nn.Module) -> nn.Module:
    hidden = getattr(cfg, "hidden_size", None) or cfg.d_model
    model = SequenceClassifier(backbone, hidden, num_labels,
                               pooling="last" if family.causal else "mean")
    model.config = cfg
    return model


TASKS = ("classification", "causal-lm", "seq2seq")


def module_for_task(cfg: Any, family: Family, task: str, num_labels: int = 2) -> nn.Module:
    """A new transformers model of ``family`` for ``task`` from ``cfg`` (random init, or shapes
    only under the meta device): a causal LM (decoder-only families), a text-to-text
    encoder-decoder (``"seq2seq"``: Switch Transformers, experts in encoder and decoder), or
    the backbone under a classification head."""
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        SwitchTransformersEncoderModel,
    )

    if task == "causal-lm":
        if not family.causal:
            raise ModelError(f"{family.name} is an encoder-decoder family: classification or "
                             "seq2seq (text-to-text), not causal-lm")
        return AutoModelForCausalLM.from_config(cfg)
    if task == "seq2seq":
        if family.causal:
            raise ModelError(f"{family.name} is decoder-only: causal-lm, not seq2seq")
        return AutoModelForSeq2SeqLM.from_config(cfg)
    if task == "classification":
        backbone = (AutoModel.from_config(cfg) if family.causal
                    else SwitchTransformersEncoderModel(cfg))
        return _classifier(cfg, family, num_labels, backbone)
    raise ModelError(f"unknown task {task!r} ({', '.join(TASKS)})")


def build_hf_model(family_name: str, task: str = "causal-lm", num_labels: int = 2,
                   seed: int = 0, impl: str = "grouped", **config_overrides: Any) -> MoEModel:
    """A random-init model of a family from its tiny config (tests, simulation)."""
    family = FAMILIES.get(family_name)
    if family is None:
        raise ModelError(f"unknown family {family_name!r}; known: {sorted(FAMILIES)}")
    torch.manual_seed(seed)
    cfg = build_config(family, **config_overrides)
    model = module_for_task(cfg, family, task, num_labels)
    return wrap_hf(model, family, task, impl, info={"source": "random-init tiny config"})


# the files a saved tokenizer leaves in a checkpoint directory (any one of them)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "vocab.txt", "spiece.model")


def load_hf_checkpoint(path: str | Path, task: str = "causal-lm", num_labels: int = 2,
                       impl: str = "grouped") -> MoEModel:
    """Load a real checkpoint from a local directory (no hub access) and convert it."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: not a model directory (no config.json)")
    cfg = read_config(path)
    family = family_for_model_type(cfg.model_type)
    if task == "causal-lm" and not family.causal:
        raise ModelError(f"{path}: {family.name} is an encoder-decoder family: classification, "
                         "or seq2seq as a model (rounds are decoder-only causal-lm or "
                         "classification: docs/models.md)")
    try:
        if task == "classification":
            model = _classifier(cfg, family, num_labels, AutoModel.from_pretrained(path))
        elif task == "seq2seq":
            model = AutoModelForSeq2SeqLM.from_pretrained(path)
        else:
            model = AutoModelForCausalLM.from_pretrained(path)
    except ValueError as exc:  # e.g. no causal-LM class for this model_type
        raise ModelError(f"{path}: transformers cannot build a {task} model of "
                         f"{cfg.model_type!r}: {str(exc).splitlines()[0]}") from exc
    info: dict[str, Any] = {"source": str(path)}
    tokenizer = None
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        # (transformers 5 would build an empty tokenizer of the family's class)
        info["tokenizer"] = f"none of {', '.join(TOKENIZER_FILES)} in the directory"
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, TypeError) as exc:
            info["tokenizer"] = ("transformers cannot load it: "
                                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    return wrap_hf(model, family, task, impl, tokenizer, info=info)
