"""Budgeted expert selection per batch (Eq. 15) and the baselines' selection rules.

Eq. 15 picks the subset A of E_union (experts routed in the batch), |A| <= C_budget, with the
largest sum of scores; with a cardinality budget that is a sort. Conventions of this module:

- **Score**: I_b(e) (Eq. 14) when ``selection_key == "ib"``, s_b(e) (Eq. 5) when
  ``"importance"``.
- **Ties** are broken deterministically by ``(layer_idx, expert_idx)`` ascending: candidates are
  sorted by ``(-score, layer_idx, expert_idx)``.
- **Budget scope** ``"global"`` (default): one pool over all MoE layers. ``per_layer_cap > 0``
  additionally caps the experts kept in any one layer; the greedy walk down the sorted list
  remains the exact optimum of Eq. 15 under both constraints (a partition matroid).
- **Budget scope** ``"per-layer"``: C_budget is split evenly over the batch's layers
  (``C // L`` each, the remainder one extra to the lowest layer indices), capped by
  ``per_layer_cap`` if set; a layer's unused quota is not moved to other layers, so the total
  never exceeds C_budget.
- Budget 0 gives an empty selection; a budget >= |E_union| keeps every routed expert.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from hfedmoe.config import MethodConfig
from hfedmoe.errors import AlgorithmError
from hfedmoe.importance import BatchStats
from hfedmoe.names import ExpertId
from hfedmoe.round_stats import RoundStats


@dataclass(frozen=True)
class Selection:
    """The experts trained on one batch (E_active of Eq. 15) and the scores that ranked them.

    Attributes:
        experts: the selected experts.
        scores: score of every candidate considered (for logging); empty for random selection.
        key: what ranked them: "ib", "importance", "random", "all" or "fixed".
        budget: the C_budget that applied (-1 when the rule ignores budgets).
        order: the selected experts, most wanted first (a round plan that must train fewer
            keeps a prefix); empty means ``sorted(experts)``.
    """

    experts: frozenset[ExpertId]
    scores: Mapping[ExpertId, float] = field(default_factory=dict)
    key: str = "ib"
    budget: int = 0
    order: tuple[ExpertId, ...] = ()

    def ranked(self) -> tuple[ExpertId, ...]:
        """The selected experts, most wanted first."""
        if self.order and frozenset(self.order) == self.experts:
            return self.order
        return tuple(sorted(self.experts))

    def per_layer(self) -> dict[int, tuple[int, ...]]:
        """layer_idx -> selected expert indices, ascending."""
        out: dict[int, list[int]] = {}
        for e in sorted(self.experts):
            out.setdefault(e.layer_idx, []).append(e.expert_idx)
        return {layer: tuple(ids) for layer, ids in out.items()}

    def __len__(self) -> int:
        """Number of selected experts, |E_active|."""
        return len(self.experts)


def _check_budget(budget: int) -> None:
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise AlgorithmError(f"budget must be an integer >= 0, got {budget!r}")


def rank_experts(scores: Mapping[ExpertId, float]) -> list[ExpertId]:
    """Experts by descending score, ties by ``(layer_idx, expert_idx)`` ascending (Eq. 15 order)."""
    return sorted(scores, key=lambda e: (-scores[e], e.layer_idx, e.expert_idx))


def _layer_quotas(layers: Iterable[int], budget: int, cap: int) -> dict[int, int]:
    ordered = sorted(layers)
    if not ordered:
        return {}
    base, extra = divmod(budget, len(ordered))
    quotas = {layer: base + (1 if i < extra else 0) for i, layer in enumerate(ordered)}
    return {layer: min(q, cap) if cap > 0 else q for layer, q in quotas.items()}


def top_budget(scores: Mapping[ExpertId, float], budget: int, *, per_layer_cap: int = 0,
               layer_quotas: Mapping[int, int] | None = None) -> frozenset[ExpertId]:
    """The top ``budget`` experts of ``scores`` (Eq. 15 as a sort), with optional per-layer limits.

    Args:
        scores: candidate -> score; only these can be selected.
        budget: C_budget, total experts kept.
        per_layer_cap: if > 0, at most this many experts per layer.
        layer_quotas: if given, at most ``layer_quotas[l]`` experts in layer l (0 if absent).

    Returns:
        The selected experts.
    """
    _check_budget(budget)
    kept: list[ExpertId] = []
    per_layer: dict[int, int] = {}
    for e in rank_experts(scores):
        if len(kept) >= budget:
            break
        limit = layer_quotas.get(e.layer_idx, 0) if layer_quotas is not None else None
        count = per_layer.get(e.layer_idx, 0)
        if (per_layer_cap > 0 and count >= per_layer_cap) or (limit is not None and count >= limit):
            continue
        kept.append(e)
        per_layer[e.layer_idx] = count + 1
    return frozenset(kept)


def select_experts(stats: BatchStats | RoundStats, budget: int, cfg: MethodConfig,
                   prior: Mapping[ExpertId, float] | None = None, *,
                   reverse: bool = False) -> Selection:
    """Budgeted selection of Eq. 15: keep the top C_budget routed experts by I_b (or s_b).

    Args:
        stats: the batch's (or round's) statistics; candidates are ``stats.routed`` (E_union).
        budget: C_budget of the client.
        cfg: ``selection_key``, ``layer_scale``, ``specificity``, ``budget_scope`` and
            ``per_layer_cap``.
        prior: the global routing prior u_global(e) the server announces; with
            ``cfg.specificity > 0`` the score gains ``specificity`` x the standardized
            client-specificity term (:func:`specificity_scores`). None or empty: no such term.
        reverse: keep the *bottom* C_budget by the same score (the anti-selection control).

    Returns:
        The :class:`Selection`, with the scores of every routed expert.

    Raises:
        AlgorithmError: negative budget or unknown selection key.
    """
    _check_budget(budget)
    scores = selection_scores(stats, cfg, prior)
    if reverse:
        scores = {e: -v for e, v in scores.items()}
    quotas = None
    if cfg.budget_scope == "per-layer":
        quotas = _layer_quotas(stats.layers, budget, cfg.per_layer_cap)
    chosen = top_budget(scores, budget, per_layer_cap=cfg.per_layer_cap, layer_quotas=quotas)
    order = tuple(e for e in rank_experts(scores) if e in chosen)
    return Selection(experts=chosen, scores=scores, key=cfg.selection_key, budget=budget,
                     order=order)


def selection_scores(stats: BatchStats | RoundStats, cfg: MethodConfig,
                     prior: Mapping[ExpertId, float] | None = None) -> dict[ExpertId, float]:
    """The score Eq. 15 ranks the routed experts by: I_b (or s_b), standardized per layer when
    ``cfg.layer_scale`` says so, plus ``cfg.specificity`` x the standardized specificity term
    when a prior is given."""
    scores = stats.scores(cfg.selection_key)
    if cfg.layer_scale == "standardized":
        scores = standardize_per_layer(scores)
    if cfg.specificity > 0 and prior:
        spec = standardize_per_layer(specificity_scores(client_usage(stats), prior, cfg.eps))
        scores = {e: v + cfg.specificity * spec.get(e, 0.0) for e, v in scores.items()}
    return scores


def client_usage(stats: BatchStats | RoundStats) -> dict[ExpertId, float]:
    """u_c(e) of every routed expert: the mean gate score over the client's tokens (Eq. 10/16)."""
    if isinstance(stats, RoundStats):
        return {e: float(stats.usage.get(e, 0.0)) for e in sorted(stats.routed)}
    return {e: float(stats.p_z[e.layer_idx][e.expert_idx]) for e in sorted(stats.routed)}


def specificity_scores(usage: Mapping[ExpertId, float], prior: Mapping[ExpertId, float],
                       eps: float = 1e-12) -> dict[ExpertId, float]:
    """Each expert's share of the client's divergence from the global routing prior,
    ``u_c(e) * log(u_c(e) / u_global(e))``: large for an expert this client routes to more than
    the clients do on average, negative for one it routes to less. An expert missing from the
    prior (never reported) gets the layer's mean prior, so it is neither favoured nor punished
    for being new."""
    by_layer: dict[int, list[float]] = {}
    for e, v in prior.items():
        by_layer.setdefault(e.layer_idx, []).append(v)
    layer_mean = {layer: sum(vs) / len(vs) for layer, vs in by_layer.items()}
    out = {}
    for e, u in usage.items():
        ref = prior.get(e, layer_mean.get(e.layer_idx, u))
        out[e] = u * math.log((u + eps) / (ref + eps))
    return out


def standardize_per_layer(scores: Mapping[ExpertId, float]) -> dict[ExpertId, float]:
    """Each layer's scores as ``(score - layer mean) / layer std`` (0 where a layer's scores
    are all equal), so one global ranking compares experts on a common scale."""
    by_layer: dict[int, list[ExpertId]] = {}
    for e in scores:
        by_layer.setdefault(e.layer_idx, []).append(e)
    out: dict[ExpertId, float] = {}
    for ids in by_layer.values():
        vals = torch.tensor([scores[e] for e in ids], dtype=torch.float64)
        std = float(vals.std(unbiased=False)) if len(ids) > 1 else 0.0
        mean = float(vals.mean())
        for e, v in zip(ids, vals.tolist(), strict=True):
            out[e] = (v - mean) / std if std > 0 else 0.0
    return out


def select_random(stats: BatchStats, budget: int, generator: torch.Generator) -> Selection:
    """FedAvg-budget baseline: ``budget`` experts drawn uniformly among the routed ones.

    Drawn among the experts some token reached (E_union), as HFedMoE's candidates are, so the
    baseline trains as many experts as HFedMoE whenever at least ``budget`` were routed; with
    ``generator`` for reproducibility (see :func:`selection_generator`).
    """
    _check_budget(budget)
    pool = sorted(stats.routed)
    perm = torch.randperm(len(pool), generator=generator).tolist()
    order = tuple(pool[i] for i in perm[:budget])
    return Selection(experts=frozenset(order), scores={}, key="random", budget=budget,
                     order=order)


def select_all(stats: BatchStats) -> Selection:
    """FedAvg-full baseline: every expert of the pool is trained, ignoring budgets."""
    return Selection(experts=frozenset(stats.all_experts()), scores={}, key="all", budget=-1)


def fedmoe_assignment(usage: Mapping[ExpertId, float], budget: int) -> frozenset[ExpertId]:
    """FedMoE-style fixed sub-model (Mei et al. 2024): the top ``budget`` experts by usage.

    ``usage`` is u_c(e) (Eq. 16) measured on the client's data before training; ties are broken
    by ``(layer_idx, expert_idx)`` ascending. The assignment is computed once and kept for every
    round.
    """
    return top_budget(usage, budget)


def select_fixed(stats: BatchStats, assignment: Iterable[ExpertId]) -> Selection:
    """FedMoE-style selection: the fixed assignment, restricted to the experts routed in the batch
    (an expert no token reached gets no gradient on this batch)."""
    assigned = frozenset(assignment)
    chosen = assigned & stats.routed
    ranked = assignment if isinstance(assignment, tuple) else sorted(assigned)
    return Selection(experts=chosen, scores={}, key="fixed", budget=len(assigned),
                     order=tuple(e for e in ranked if e in chosen))


def selection_generator(seed: int, client_id: str, round_idx: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, client_id, round_idx)`` with a stable hash (SHA-256),
    so random selections reproduce across processes and machines."""
    digest = hashlib.sha256(f"{seed}:{client_id}:{round_idx}".encode()).digest()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return gen
