"""A reference implementation of DeepSeekMoE's ``modeling_deepseek.py`` (deepseek-ai/
deepseek-moe-16b-base, ``trust_remote_code``), for tests: the same modules, parameter names and
computation (eager attention, ``MoEGate``, ``DeepseekMoE`` with its training and inference
paths, ``AddAuxiliaryLoss``), written in plain torch without caches or tensor-parallel slices.

``ReferenceDeepseekForCausalLM(cfg).state_dict()`` has the checkpoint's names
(``model.layers.N.mlp.experts.E.gate_proj.weight``, ``model.layers.N.mlp.gate.weight``,
``model.layers.N.mlp.shared_experts.*``, ...).
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def reference_config(raw: dict[str, Any]) -> SimpleNamespace:
    """``configuration_deepseek.DeepseekConfig``'s defaults, overridden by ``raw``."""
    cfg = dict(vocab_size=102400, hidden_size=4096, intermediate_size=11008,
               moe_intermediate_size=1407, num_hidden_layers=30, num_attention_heads=32,
               num_key_value_heads=None, n_shared_experts=None, n_routed_experts=None,
               num_experts_per_tok=None, moe_layer_freq=1, first_k_dense_replace=0,
               norm_topk_prob=False, scoring_func="softmax", aux_loss_alpha=0.001,
               seq_aux=True, hidden_act="silu", max_position_embeddings=2048,
               rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
               attention_bias=False, attention_dropout=0.0)
    cfg.update(raw)
    if cfg["num_key_value_heads"] is None:
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    return SimpleNamespace(**cfg)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """``DeepseekRotaryEmbedding``: cos/sin caches of ``t * inv_freq``, ``cat(freqs, freqs)``."""

    def __init__(self, dim: int, max_positions: int, base: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        t = torch.arange(max_positions, dtype=inv_freq.dtype)
        emb = torch.cat((torch.outer(t, inv_freq),) * 2, dim=-1)
        self.register_buffer("cos_cached", emb.cos(), persistent=False)
        self.register_buffer("sin_cached", emb.sin(), persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor,
                position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.cos_cached[position_ids].unsqueeze(1)  # (B, 1, T, hd)
        sin = self.sin_cached[position_ids].unsqueeze(1)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class MLP(nn.Module):
    def __init__(self, cfg: SimpleNamespace, intermediate_size: int | None = None) -> None:
        super().__init__()
        width = cfg.intermediate_size if intermediate_size is None else intermediate_size
        self.gate_proj = nn.Linear(cfg.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEGate(nn.Module):
    """Softmax over the routed experts, top-k (unsorted), optional renormalisation, aux loss."""

    def __init__(self, cfg: SimpleNamespace) -> None:
        super().__init__()
        self.cfg = cfg
        self.top_k = cfg.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        bsz, seq_len, h = hidden.shape
        logits = F.linear(hidden.view(-1, h), self.weight, None)
        if self.cfg.scoring_func != "softmax":
            raise NotImplementedError(self.cfg.scoring_func)
        scores = logits.softmax(dim=-1)
        topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.cfg.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        aux_loss = None
        if self.training and self.cfg.aux_loss_alpha > 0.0:
            aux_loss = self._aux_loss(scores, topk_idx, bsz, seq_len)
        return topk_idx, topk_weight, aux_loss

    def _aux_loss(self, scores: torch.Tensor, topk_idx: torch.Tensor, bsz: int,
                  seq_len: int) -> torch.Tensor:
        n, k, alpha = self.cfg.n_routed_experts, self.top_k, self.cfg.aux_loss_alpha
        idx = topk_idx.view(bsz, -1)
        if self.cfg.seq_aux:
            ce = torch.zeros(bsz, n, device=scores.device)
            ce.scatter_add_(1, idx, torch.ones(bsz, seq_len * k, device=scores.device))
            ce = ce.div_(seq_len * k / n)
            return (ce * scores.view(bsz, seq_len, -1).mean(dim=1)).sum(dim=1).mean() * alpha
        fi = F.one_hot(idx.view(-1), num_classes=n).float().mean(0) * n
        return (scores.mean(0) * fi).sum() * alpha


class AddAuxiliaryLoss(torch.autograd.Function):
    """Identity on ``x``; the aux loss's gradient (1) flows back at the same time."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.dtype, ctx.required = loss.dtype, loss.requires_grad
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return grad, torch.ones(1, dtype=ctx.dtype, device=grad.device) if ctx.required else None


class DeepseekMoE(nn.Module):
    """Routed experts (weighted by the gate) plus the shared experts, added without a gate."""

    def __init__(self, cfg: SimpleNamespace) -> None:
        super().__init__()
        self.cfg = cfg
        self.experts = nn.ModuleList(MLP(cfg, cfg.moe_intermediate_size)
                                     for _ in range(cfg.n_routed_experts))
        self.gate = MoEGate(cfg)
        if cfg.n_shared_experts is not None:
            self.shared_experts = MLP(cfg, cfg.moe_intermediate_size * cfg.n_shared_experts)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        identity, shape = hidden, hidden.shape
        topk_idx, topk_weight, aux_loss = self.gate(hidden)
        x = hidden.view(-1, shape[-1])
        flat_idx = topk_idx.view(-1)
        if self.training:
            x = x.repeat_interleave(self.cfg.num_experts_per_tok, dim=0)
            y = torch.empty_like(x)
            for i, expert in enumerate(self.experts):
                y[flat_idx == i] = expert(x[flat_idx == i])
            y = (y.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)).sum(dim=1)
            y = y.view(*shape)
            if aux_loss is not None:
                y = AddAuxiliaryLoss.apply(y, aux_loss)
        else:
            y = self.moe_infer(x, flat_idx, topk_weight.view(-1, 1)).view(*shape)
        if self.cfg.n_shared_experts is not None:
            y = y + self.shared_experts(identity)
        return y

    @torch.no_grad()
    def moe_infer(self, x: torch.Tensor, flat_idx: torch.Tensor,
                  flat_weight: torch.Tensor) -> torch.Tensor:
        cache = torch.zeros_like(x)
        idxs = flat_idx.argsort()
        ends = flat_idx.bincount(minlength=len(self.experts)).cpu().numpy().cumsum(0)
        token_idxs = idxs // self.cfg.num_experts_per_tok
        for i, end in enumerate(ends):
            start = 0 if i == 0 else ends[i - 1]
            if start == end:
                continue
            tok = token_idxs[start:end]
            out = self.experts[i](x[tok]) * flat_weight[idxs[start:end]]
            cache.scatter_reduce_(0, tok.view(-1, 1).repeat(1, x.shape[-1]), out, reduce="sum")
        return cache


class Attention(nn.Module):
    """``DeepseekAttention`` (eager): Llama multi-head attention with RoPE, GQA by repeat."""

    def __init__(self, cfg: SimpleNamespace) -> None:
        super().__init__()
        self.cfg = cfg
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // self.heads
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.rotary_emb = RotaryEmbedding(self.head_dim, cfg.max_position_embeddings,
                                          cfg.rope_theta)

    def forward(self, x: torch.Tensor, mask: torch.Tensor,
                position_ids: torch.Tensor) -> torch.Tensor:
        bsz, q_len, _ = x.shape
        q = self.q_proj(x).view(bsz, q_len, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, q_len, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, q_len, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rotary_emb(q, k, position_ids)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        w = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head_dim) + mask
        w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(w, v).transpose(1, 2).reshape(bsz, q_len, -1)
        return self.o_proj(out)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: SimpleNamespace, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        moe = (cfg.n_routed_experts is not None and layer_idx >= cfg.first_k_dense_replace
               and layer_idx % cfg.moe_layer_freq == 0)
        self.mlp = DeepseekMoE(cfg) if moe else MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor,
                position_ids: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), mask, position_ids)
        return x + self.mlp(self.post_attention_layernorm(x))


class DeepseekModel(nn.Module):
    def __init__(self, cfg: SimpleNamespace) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Final hidden states and every decoder layer's output (before the final norm)."""
        x = self.embed_tokens(input_ids)
        bsz, seq = input_ids.shape
        position_ids = torch.arange(seq).unsqueeze(0).expand(bsz, -1)
        allowed = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None] \
            & attention_mask[:, None, None, :].bool()  # (B, 1, T, T)
        mask = torch.zeros(allowed.shape, dtype=x.dtype).masked_fill(~allowed,
                                                                     torch.finfo(x.dtype).min)
        outputs = []
        for layer in self.layers:
            x = layer(x, mask, position_ids)
            outputs.append(x)
        return self.norm(x), outputs


class ReferenceDeepseekForCausalLM(nn.Module):
    """``DeepseekForCausalLM``: decoder + untied ``lm_head``; the shifted LM loss."""

    def __init__(self, cfg: SimpleNamespace) -> None:
        super().__init__()
        self.model = DeepseekModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        for module in self.modules():  # DeepseekPreTrainedModel._init_weights
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None) -> SimpleNamespace:
        hidden, layers = self.model(input_ids, attention_mask)
        logits = self.lm_head(hidden).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[..., :-1, :].reshape(-1, logits.shape[-1]),
                                   labels[..., 1:].reshape(-1), ignore_index=-100)
        return SimpleNamespace(logits=logits, hidden_states=layers, loss=loss)
