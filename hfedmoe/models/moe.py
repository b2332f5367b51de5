"""The kit's own MoE block, and sparse upcycling of a dense FFN into it.

Sparse upcycling (Komatsuzaki et al. 2023; the recipe behind Qwen1.5-MoE) copies a pretrained
FFN into S experts and adds a fresh router. Right after conversion every expert equals the dense
FFN, so with top-k weights normalised to sum to 1 the MoE layer's output equals the dense
layer's output exactly.

With exactly normalised weights the router would get no gradient at that point (the experts are
identical, so the normalisation cancels it). ``norm_topk="detached"`` keeps the same forward
values (weights divided by their detached sum) while the router receives the gradient of the
selected gate mass, as a Switch-style ``p_i * E_i(x)`` layer does; the router starts learning at
once and the forward stays equivalent to the dense model.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from hfedmoe.experts import ExpertBank, ExpertShape

NormTopK = Literal["none", "exact", "detached"]


class TopKRouter(nn.Module):
    """Softmax router returning ``(router_logits (T,E), top_k_weights (T,k), top_k_index (T,k))``.

    Same contract as transformers 5's ``*TopKRouter`` modules, so one capture hook reads both.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int,
                 norm_topk: NormTopK = "detached", init_std: float = 0.01) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.norm_topk = norm_topk
        self.weight = nn.Parameter(torch.randn(num_experts, d_model) * init_std)

    def forward(self, hidden_states: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = hidden_states.reshape(-1, self.weight.shape[1])  # (T, d)
        logits = F.linear(x, self.weight)  # (T, E)
        probs = torch.softmax(logits.float(), dim=-1)
        top_w, top_idx = torch.topk(probs, self.top_k, dim=-1)  # (T, k)
        if self.norm_topk == "exact":
            top_w = top_w / top_w.sum(-1, keepdim=True)
        elif self.norm_topk == "detached":
            top_w = top_w / top_w.sum(-1, keepdim=True).detach()
        return logits, top_w.to(x.dtype), top_idx


class SparseMoE(nn.Module):
    """Router + experts over (batch, seq, d) hidden states."""

    def __init__(self, router: TopKRouter, experts: ExpertBank) -> None:
        super().__init__()
        self.gate = router
        self.experts = experts

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (T, d)
        _, top_w, top_idx = self.gate(x)
        return self.experts(x, top_idx, top_w).reshape(shape)


def upcycle_linear_pair(fc_in: nn.Linear, fc_out: nn.Linear, activation: str,
                        num_experts: int, top_k: int, init_std: float = 0.01,
                        impl: str = "grouped") -> SparseMoE:
    """Copy a dense ``fc_out(act(fc_in(x)))`` FFN into ``num_experts`` identical experts."""
    shape = ExpertShape(d_model=fc_in.in_features, d_ff=fc_in.out_features,
                        activation=activation, gated=False, bias=fc_in.bias is not None)
    bank = ExpertBank(shape, num_experts, impl=impl)
    with torch.no_grad():
        for expert in bank.experts:
            expert.w_in.copy_(fc_in.weight)
            expert.w_out.copy_(fc_out.weight)
            if shape.bias:
                expert.b_in.copy_(fc_in.bias)
                expert.b_out.copy_(fc_out.bias)
    router = TopKRouter(shape.d_model, num_experts, top_k, "detached", init_std)
    return SparseMoE(router, bank)


def split_linear_pair(fc_in: nn.Linear, fc_out: nn.Linear, activation: str,
                      num_experts: int, impl: str = "grouped") -> SparseMoE:
    """Partition the FFN's neurons into ``num_experts`` experts (all active: equals the FFN).

    Expert e gets neurons [e*F/S, (e+1)*F/S) and 1/S of the output bias; with top_k = S and
    unit weights (router weights all 1 via ``norm_topk="none"`` on a zero router scaled by S)
    the sum of experts equals the dense FFN.
    """
    d_ff = fc_in.out_features
    if d_ff % num_experts:
        raise ValueError(f"d_ff={d_ff} is not divisible by num_experts={num_experts}")
    part = d_ff // num_experts
    groups = [torch.arange(e * part, (e + 1) * part) for e in range(num_experts)]
    bank = bank_from_neuron_groups(fc_in, fc_out, activation, groups, num_experts, impl)
    router = TopKRouter(bank.shape.d_model, num_experts, num_experts, "exact", init_std=0.0)
    return SparseMoE(router, bank)


def bank_from_neuron_groups(fc_in: nn.Linear, fc_out: nn.Linear, activation: str,
                            groups: list[torch.Tensor], out_scale: float,
                            impl: str = "grouped") -> ExpertBank:
    """One expert per group of FFN neurons: ``W1[g], b1[g]``, ``out_scale * W2[:, g]`` and the
    full output bias ``b2`` (routing weights summing to 1 then add it once)."""
    shape = ExpertShape(fc_in.in_features, len(groups[0]), activation, gated=False,
                        bias=fc_in.bias is not None)
    bank = ExpertBank(shape, len(groups), impl=impl)
    with torch.no_grad():
        for expert, rows in zip(bank.experts, groups, strict=True):
            expert.w_in.copy_(fc_in.weight[rows])
            expert.w_out.copy_(fc_out.weight[:, rows] * out_scale)
            if shape.bias:
                expert.b_in.copy_(fc_in.bias[rows])
                expert.b_out.copy_(fc_out.bias)
    return bank
