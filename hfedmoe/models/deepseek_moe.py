"""DeepSeekMoE (``model_type: "deepseek"``, e.g. DeepSeekMoE-16B) on transformers' DeepSeek-OCR-2
text decoder, exactly.

DeepSeekMoE's checkpoints ship their own modeling code (``trust_remote_code``), which the kit
never runs; transformers 5.23 has no ``"deepseek"`` model type. Its decoder is nevertheless in
transformers, under another name: the language model of DeepSeek-OCR-2
(``transformers.models.deepseek_ocr2``, ``DeepseekOcr2TextModel``) is the same architecture,
piece for piece, as ``modeling_deepseek.py`` of DeepSeekMoE:

- attention: Llama multi-head attention with ``rotate_half`` RoPE
  (``DeepseekAttention`` = ``DeepseekOcr2TextAttention``);
- router: softmax over all routed experts, top-k (unsorted), no renormalisation when
  ``norm_topk_prob`` is false (``MoEGate`` = ``DeepseekOcr2TextTopkRouter`` with
  ``topk_method="greedy"`` and ``routed_scaling_factor`` 1.0);
- routed experts: SiLU-gated MLPs of width ``moe_intermediate_size`` (stored fused in
  ``DeepseekOcr2TextExperts``);
- shared experts: one SiLU-gated MLP of width ``n_shared_experts * moe_intermediate_size``,
  added without a gate (``shared_experts`` in both);
- dense layers: layer i is an MoE layer iff ``i >= first_k_dense_replace`` and
  ``i % moe_layer_freq == 0`` (the family's ``mlp_layer_types``, set from that rule);
- RMSNorm, embeddings, an untied ``lm_head`` (:class:`DeepseekMoeForCausalLM` below).

So the conversion is a config mapping (:class:`DeepseekMoeConfig`, registered with
``AutoConfig`` as ``"deepseek"``) and a state-dict mapping: every checkpoint name is the
family's own except the routed experts, ``model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight``,
which are stacked into ``mlp.experts.gate_up_proj`` (E, 2F, d) = ``[gate_E; up_E]`` and
``mlp.experts.down_proj`` (E, d, F) by transformers' own loader (a registered checkpoint
conversion, the one Qwen2-MoE checkpoints use). A directory with DeepSeekMoE's ``config.json``
(and weights) then loads with ``AutoModelForCausalLM`` like any other family, and the kit's
generic adapter (:mod:`hfedmoe.models.generic`) converts its experts.

What is *not* representable is refused with the reason (:meth:`DeepseekMoeConfig.validate_architecture`):
``norm_topk_prob: true`` (the family never renormalises the top-k weights),
``scoring_func`` other than softmax, ``n_shared_experts: null`` (the family always adds a shared
MLP) and ``rope_scaling`` (only the default RoPE is checked against the reference).
The training-time auxiliary balance loss of DeepSeek's own code (``aux_loss_alpha``, added to
the gradient through ``AddAuxiliaryLoss``) is not part of the family's forward: the kit trains
with the language-model loss alone.
``tests/hfedmoe/test_deepseek_moe.py`` checks the outputs against a reference implementation of
``modeling_deepseek.py`` on tiny random configs.
"""

from __future__ import annotations

from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.deepseek_ocr2.configuration_deepseek_ocr2 import DeepseekOcr2TextConfig
from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import (
    DeepseekOcr2TextModel,
    DeepseekOcr2TextPreTrainedModel,
)

from hfedmoe.errors import ModelError

MODEL_TYPE = "deepseek"
FAMILY_MODULE = "transformers.models.deepseek_ocr2 (DeepseekOcr2TextModel)"


@strict
class DeepseekMoeConfig(DeepseekOcr2TextConfig):
    """DeepSeekMoE's ``config.json`` (``configuration_deepseek.DeepseekConfig``'s fields and
    defaults) as a DeepSeek-OCR-2 text config: ``mlp_layer_types`` comes from
    ``first_k_dense_replace`` and ``moe_layer_freq``; ``rope_theta`` becomes ``rope_parameters``."""

    model_type = MODEL_TYPE
    base_config_key = ""

    # DeepseekConfig's defaults where they differ from the DeepSeek-OCR-2 text config's
    num_hidden_layers: int = 30
    bos_token_id: int | None = 100000
    eos_token_id: int | list[int] | None = 100001
    n_routed_experts: int | None = None
    n_shared_experts: int | None = None
    # DeepseekConfig's MoE fields that the family has no field for
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        if self.mlp_layer_types is None:
            self.mlp_layer_types = moe_layer_types(self.num_hidden_layers, self.n_routed_experts,
                                                   self.first_k_dense_replace,
                                                   self.moe_layer_freq)
        super().__post_init__(**kwargs)

    def validate_architecture(self) -> None:
        """Refuse what the family cannot compute exactly: a :class:`ModelError` saying what
        (not a ``ValueError``, which transformers' strict validation would wrap)."""
        super().validate_architecture()
        why = unrepresentable(self)
        if why:
            raise ModelError(f"DeepSeekMoE config not representable exactly on {FAMILY_MODULE}: "
                             f"{why}")


def moe_layer_types(num_layers: int, n_routed_experts: int | None, first_k_dense_replace: int,
                    moe_layer_freq: int) -> list[str]:
    """``DeepseekDecoderLayer``'s rule: layer i is an MoE layer iff routed experts exist,
    ``i >= first_k_dense_replace`` and ``i % moe_layer_freq == 0``."""
    return ["sparse" if (n_routed_experts is not None and i >= first_k_dense_replace
                         and i % moe_layer_freq == 0) else "dense" for i in range(num_layers)]


def unrepresentable(cfg: DeepseekMoeConfig) -> str:
    """Why ``cfg`` differs from what the family computes, or ``""`` when it does not."""
    top_k = cfg.num_experts_per_tok
    if cfg.scoring_func != "softmax":
        return f"scoring_func {cfg.scoring_func!r} (DeepSeekMoE and the family: softmax only)"
    if cfg.norm_topk_prob and (top_k or 0) > 1:
        return ("norm_topk_prob true: MoEGate renormalises the top-k weights, the family's "
                "router (DeepseekOcr2TextTopkRouter) never does")
    if cfg.n_routed_experts is not None and not cfg.n_shared_experts:
        return ("n_shared_experts null/0: the family always adds a shared MLP of width "
                "n_shared_experts * moe_intermediate_size")
    if cfg.n_routed_experts is not None and not top_k:
        return "num_experts_per_tok is not set"
    if cfg.topk_method != "greedy" or cfg.routed_scaling_factor != 1.0:
        return "topk_method must be 'greedy' and routed_scaling_factor 1.0 (MoEGate has neither)"
    rope = cfg.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        return (f"rope_scaling {rope.get('rope_type')!r}: only the default RoPE is checked "
                "against modeling_deepseek.py")
    return ""


class DeepseekMoeModel(DeepseekOcr2TextModel):
    """The decoder (``DeepseekModel`` of DeepSeekMoE), for :class:`DeepseekMoeConfig`."""

    config_class = DeepseekMoeConfig


class DeepseekMoeForCausalLM(DeepseekOcr2TextPreTrainedModel, GenerationMixin):
    """``DeepseekForCausalLM``: the decoder and an untied ``lm_head`` (no logit scaling).

    Parameter names are DeepSeekMoE's (``model.*``, ``lm_head.weight``); only the routed
    experts are stored fused, as in every transformers 5 MoE family."""

    config_class = DeepseekMoeConfig
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DeepseekMoeConfig) -> None:
        super().__init__(config)
        self.model = DeepseekMoeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.LongTensor | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Any = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs: Any) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=past_key_values,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden = slice_logits_to_keep(out.last_hidden_state, logits_to_keep)  # (B, T, d)
        logits = self.lm_head(hidden)  # (B, T, V)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels,
                                      vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      past_key_values=out.past_key_values,
                                      hidden_states=out.hidden_states,
                                      attentions=out.attentions)


def checkpoint_conversion() -> list[WeightConverter]:
    """DeepSeekMoE's per-expert checkpoint names -> the family's fused expert tensors."""
    return [
        WeightConverter(source_patterns=["mlp.experts.*.gate_proj.weight",
                                         "mlp.experts.*.up_proj.weight"],
                        target_patterns="mlp.experts.gate_up_proj",
                        operations=[MergeModulelist(dim=0), Concatenate(dim=1)]),
        WeightConverter(source_patterns="mlp.experts.*.down_proj.weight",
                        target_patterns="mlp.experts.down_proj",
                        operations=[MergeModulelist(dim=0)]),
    ]


_registered = False


def register() -> None:
    """Make ``"deepseek"`` a model type of the installed transformers (config, base model,
    causal LM, checkpoint conversion). Idempotent; a transformers that knows ``"deepseek"``
    itself keeps its own."""
    global _registered
    if _registered:
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if MODEL_TYPE not in CONFIG_MAPPING_NAMES:
        AutoConfig.register(MODEL_TYPE, DeepseekMoeConfig, exist_ok=True)
        AutoModel.register(DeepseekMoeConfig, DeepseekMoeModel, exist_ok=True)
        AutoModelForCausalLM.register(DeepseekMoeConfig, DeepseekMoeForCausalLM, exist_ok=True)
        register_checkpoint_conversion_mapping(MODEL_TYPE, checkpoint_conversion(),
                                               overwrite=True)
    _registered = True


def tiny_config() -> dict[str, Any]:
    """A tiny DeepSeekMoE config (tests, simulation): layer 0 dense, then MoE layers with
    4 routed experts (top-2, no renormalisation) and 2 shared experts."""
    return dict(vocab_size=512, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=4, intermediate_size=64, moe_intermediate_size=16,
                n_routed_experts=4, n_shared_experts=2, num_experts_per_tok=2,
                first_k_dense_replace=1, moe_layer_freq=1, norm_topk_prob=False,
                scoring_func="softmax", max_position_embeddings=256, pad_token_id=0,
                bos_token_id=1, eos_token_id=2,
                tie_word_embeddings=False)
