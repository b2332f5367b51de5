"""Expert importance and information-bottleneck scores of one batch (Eq. 3-5, 10, 11, 14), and
their accumulation over a client's round (Eq. 16 and the s^c(e) Decision of METHOD.md).

Inputs are the gate probabilities captured in the forward pass, one tensor per MoE layer::

    gate_scores[layer_idx]    (tokens, num_experts)  softmax gate scores G_e(x)
    routed_indices[layer_idx] (tokens, top_k)        expert indices each token was routed to
    token_mask[layer_idx]     (tokens,) bool         optional; False marks padding

For token-level routers a "sample" of the paper is a token, so every statistic runs over the
tokens of the batch that reach the layer. Padding is excluded by the optional ``token_mask``
(masked tokens count neither in B, nor in the max of Eq. 4, nor in E_union); a caller may
instead drop padded rows before the call, which gives the same result.

Statistics are computed in float64 for float64 inputs and in float32 otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from hfedmoe.config import MethodConfig
from hfedmoe.errors import AlgorithmError
from hfedmoe.names import ExpertId

Tensor = torch.Tensor


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _checked_gates(gates: Tensor, where: str = "gate_scores") -> Tensor:
    if gates.dim() != 2:
        raise AlgorithmError(f"{where} must be (tokens, num_experts), got shape {tuple(gates.shape)}")
    if gates.shape[0] == 0 or gates.shape[1] == 0:
        raise AlgorithmError(f"{where} is empty: shape {tuple(gates.shape)}")
    if not gates.is_floating_point():
        raise AlgorithmError(f"{where} must be floating point, got {gates.dtype}")
    out = gates.detach().to(_work_dtype(gates))  # (tokens, num_experts)
    if not bool(torch.isfinite(out).all()) or bool((out < 0).any()):
        raise AlgorithmError(f"{where} must be finite and non-negative")
    return out


def s_cumul(gates: Tensor) -> Tensor:
    """Average routing strength, Eq. 3: ``s_cumul(e) = (1/B) sum_i G_e(x_i)``.

    Args:
        gates: (tokens, num_experts) gate probabilities of one layer.

    Returns:
        (num_experts,) tensor.
    """
    return _checked_gates(gates).mean(dim=0)  # (num_experts,)


def s_specific(gates: Tensor) -> Tensor:
    """Peak relevance to one token, Eq. 4: ``s_specific(e) = max_i G_e(x_i)``."""
    return _checked_gates(gates).amax(dim=0)  # (num_experts,)


def importance_score(gates: Tensor, lam: float) -> Tensor:
    """Batch importance, Eq. 5: ``s_b(e) = lam * s_cumul(e) + (1 - lam) * s_specific(e)``."""
    if not 0.0 <= lam <= 1.0:
        raise AlgorithmError(f"lam must be in [0, 1], got {lam}")
    g = _checked_gates(gates)  # (tokens, num_experts)
    return lam * g.mean(dim=0) + (1.0 - lam) * g.amax(dim=0)  # (num_experts,)


def marginal_activation(gates: Tensor) -> Tensor:
    """Marginal p(z_e), Eq. 10: ``p(z_e) = (1/B) sum_j G_e(x_j)`` (numerically equal to Eq. 3)."""
    return _checked_gates(gates).mean(dim=0)  # (num_experts,)


def kl_term(gates: Tensor, eps: float = 1e-12) -> Tensor:
    """One-sided KL term, Eq. 11: ``KL_b(e) = (1/B) sum_i G_e(x_i) log(G_e(x_i) / p(z_e))``.

    Implemented exactly as written (not the full Bernoulli KL). Both logarithms take their
    argument clamped below at ``eps``, so a token with ``G_e(x) = 0`` contributes ``0 * finite =
    0`` (the limit of ``x log x``) and an expert with ``p(z_e) = 0`` gives 0, never NaN. For
    ``G >= eps`` the value is exact.

    Args:
        gates: (tokens, num_experts) gate probabilities of one layer.
        eps: lower clamp inside the logarithms.

    Returns:
        (num_experts,) tensor.
    """
    g = _checked_gates(gates)  # (tokens, num_experts)
    p = g.mean(dim=0, keepdim=True)  # (1, num_experts)
    log_ratio = g.clamp_min(eps).log() - p.clamp_min(eps).log()  # (tokens, num_experts)
    return (g * log_ratio).mean(dim=0)  # (num_experts,)


def ib_score(gates: Tensor, lam: float, beta: float, eps: float = 1e-12) -> Tensor:
    """Information-bottleneck score, Eq. 14: ``I_b(e) = s_b(e) - beta * KL_b(e)``."""
    return importance_score(gates, lam) - beta * kl_term(gates, eps)  # (num_experts,)


@dataclass(frozen=True)
class BatchStats:
    """Per-layer statistics of one batch; every tensor is (num_experts,) for its layer.

    Attributes:
        s_cumul: Eq. 3. Equal to ``p_z`` (Eq. 10 is the same average).
        s_specific: Eq. 4.
        s_b: Eq. 5.
        p_z: Eq. 10.
        kl: Eq. 11.
        ib: Eq. 14.
        gate_sum: sum of G_e(x) over the layer's unmasked tokens (feeds Eq. 16).
        num_tokens: unmasked tokens that reached each layer (B).
        routed: E_union, every expert some unmasked token was routed to.
        routed_count: (num_experts,) how many unmasked tokens were routed to each expert
            (routing frequency, FedMoE's activation statistic).
    """

    s_cumul: Mapping[int, Tensor]
    s_specific: Mapping[int, Tensor]
    s_b: Mapping[int, Tensor]
    p_z: Mapping[int, Tensor]
    kl: Mapping[int, Tensor]
    ib: Mapping[int, Tensor]
    gate_sum: Mapping[int, Tensor]
    num_tokens: Mapping[int, int]
    routed: frozenset[ExpertId]
    routed_count: Mapping[int, Tensor] = field(default_factory=dict)

    @property
    def layers(self) -> tuple[int, ...]:
        """MoE layer indices present, ascending."""
        return tuple(sorted(self.s_b))

    def num_experts(self, layer_idx: int) -> int:
        """Number of experts S of MoE layer ``layer_idx``."""
        return int(self.s_b[layer_idx].shape[0])

    def all_experts(self) -> tuple[ExpertId, ...]:
        """Every expert of the layers present (the pool E), in (layer, expert) order."""
        return tuple(ExpertId(layer, e) for layer in self.layers
                     for e in range(self.num_experts(layer)))

    def scores(self, key: str) -> dict[ExpertId, float]:
        """``{e: score}`` over the routed experts for ``key`` in {"ib", "importance"}."""
        table = {"ib": self.ib, "importance": self.s_b}.get(key)
        if table is None:
            raise AlgorithmError(f"unknown selection key {key!r}; valid: ib, importance")
        return {e: float(table[e.layer_idx][e.expert_idx]) for e in sorted(self.routed)}


def _layer_inputs(layer_idx: int, gates: Tensor, routed: Tensor,
                  mask: Tensor | None) -> tuple[Tensor, Tensor]:
    where = f"layer {layer_idx}"
    g = _checked_gates(gates, f"gate_scores[{layer_idx}]")  # (tokens, num_experts)
    if routed.dim() != 2 or routed.shape[0] != g.shape[0]:
        raise AlgorithmError(f"{where}: routed_indices must be (tokens={g.shape[0]}, top_k), "
                             f"got {tuple(routed.shape)}")
    if routed.is_floating_point() or routed.dtype == torch.bool:
        raise AlgorithmError(f"{where}: routed_indices must be integer, got {routed.dtype}")
    if routed.numel() and (int(routed.min()) < 0 or int(routed.max()) >= g.shape[1]):
        raise AlgorithmError(f"{where}: routed index outside [0, {g.shape[1]})")
    if mask is not None:
        if mask.dtype != torch.bool or tuple(mask.shape) != (g.shape[0],):
            raise AlgorithmError(f"{where}: token_mask must be bool ({g.shape[0]},), "
                                 f"got {mask.dtype} {tuple(mask.shape)}")
        g, routed = g[mask], routed[mask]  # (kept, num_experts), (kept, top_k)
        if g.shape[0] == 0:
            raise AlgorithmError(f"{where}: every token is masked")
    return g, routed


def compute_batch_stats(gate_scores: Mapping[int, Tensor], routed_indices: Mapping[int, Tensor],
                        cfg: MethodConfig,
                        token_mask: Mapping[int, Tensor] | None = None) -> BatchStats:
    """All batch statistics of Eq. 3-5, 10, 11 and 14 for every MoE layer.

    Args:
        gate_scores: layer_idx -> (tokens, num_experts) softmax gate probabilities.
        routed_indices: layer_idx -> (tokens, top_k) routed expert indices; same layers.
        cfg: supplies ``lam`` (Eq. 5), ``beta`` (Eq. 14) and ``eps`` (Eq. 11 guard).
        token_mask: optional layer_idx -> (tokens,) bool, False for padding.

    Returns:
        The batch's :class:`BatchStats`.

    Raises:
        AlgorithmError: mismatched layers or shapes, bad indices, empty or non-finite input.
    """
    if not gate_scores:
        raise AlgorithmError("gate_scores is empty")
    if set(gate_scores) != set(routed_indices):
        raise AlgorithmError(f"gate_scores layers {sorted(gate_scores)} != routed_indices "
                             f"layers {sorted(routed_indices)}")
    if token_mask is not None and set(token_mask) != set(gate_scores):
        raise AlgorithmError("token_mask must name the same layers as gate_scores")
    out: dict[str, dict[int, Tensor]] = {k: {} for k in
                                          ("s_cumul", "s_specific", "s_b", "kl", "ib", "gate_sum")}
    num_tokens: dict[int, int] = {}
    counts: dict[int, Tensor] = {}
    routed_set: set[ExpertId] = set()
    for layer_idx in sorted(gate_scores):
        mask = token_mask[layer_idx] if token_mask is not None else None
        g, routed = _layer_inputs(layer_idx, gate_scores[layer_idx], routed_indices[layer_idx], mask)
        cumul = g.mean(dim=0)  # (num_experts,)  Eq. 3 = Eq. 10
        specific = g.amax(dim=0)  # (num_experts,)  Eq. 4
        s_b = cfg.lam * cumul + (1.0 - cfg.lam) * specific  # (num_experts,)  Eq. 5
        kl = kl_term(g, cfg.eps)  # (num_experts,)  Eq. 11
        out["s_cumul"][layer_idx] = cumul
        out["s_specific"][layer_idx] = specific
        out["s_b"][layer_idx] = s_b
        out["kl"][layer_idx] = kl
        out["ib"][layer_idx] = s_b - cfg.beta * kl
        out["gate_sum"][layer_idx] = g.sum(dim=0)
        num_tokens[layer_idx] = int(g.shape[0])
        counts[layer_idx] = torch.bincount(routed.reshape(-1), minlength=g.shape[1])
        routed_set.update(ExpertId(layer_idx, int(i)) for i in torch.unique(routed).tolist())
    return BatchStats(p_z=dict(out["s_cumul"]), num_tokens=num_tokens,
                      routed=frozenset(routed_set), routed_count=counts, **out)
