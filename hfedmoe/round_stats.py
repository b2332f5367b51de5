"""A client's statistics over one round: usage u_c(e) (Eq. 16) and importance s^c(e).

The device agent feeds :class:`RoundAccumulator` one :class:`~hfedmoe.importance.BatchStats`
(and the experts it trained on that batch) at a time; memory is O(num_experts), independent of
the number of batches.

- ``u_c(e)`` (Eq. 16) is the mean gate score of expert e over every unmasked token of the
  client's round that reached e's layer (for token-level routers "sample" means token).
- ``s^c(e)`` (METHOD.md Decision) is the mean of s_b(e) (Eq. 5) over the client's batches.
- Three sets are kept apart for logging: ``routed`` (forward), ``updated`` (backward: the union
  of the batches' E_active) and ``aggregated(tau)`` (updated with u_c(e) >= tau, Eq. 17).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from hfedmoe.errors import AlgorithmError
from hfedmoe.importance import BatchStats
from hfedmoe.names import ExpertId


@dataclass(frozen=True)
class RoundStats:
    """One client's round statistics, ready for :class:`~hfedmoe.update.SparseUpdate`.

    Attributes:
        usage: u_c(e) of Eq. 16 for every expert of the layers seen.
        importance: s^c(e), the mean of s_b(e) over the round's batches.
        routed: experts some token was routed to in the round.
        updated: experts trained in some batch of the round.
        num_tokens: unmasked tokens per layer over the round.
        num_batches: batches consumed.
    """

    usage: Mapping[ExpertId, float]
    importance: Mapping[ExpertId, float]
    routed: frozenset[ExpertId]
    updated: frozenset[ExpertId]
    num_tokens: Mapping[int, int]
    num_batches: int

    def aggregated(self, tau: float) -> frozenset[ExpertId]:
        """Experts the server will average: updated and ``u_c(e) >= tau`` (Eq. 17)."""
        return frozenset(e for e in self.updated if self.usage.get(e, 0.0) >= tau)

    def usage_set(self, tau: float) -> frozenset[ExpertId]:
        """S_c of Eq. 18: every expert with ``u_c(e) >= tau``."""
        return frozenset(e for e, u in self.usage.items() if u >= tau)


class RoundAccumulator:
    """Running sums that turn per-batch statistics into :class:`RoundStats` (Eq. 16)."""

    def __init__(self) -> None:
        self._gate_sum: dict[int, torch.Tensor] = {}  # layer -> (num_experts,)
        self._s_b_sum: dict[int, torch.Tensor] = {}  # layer -> (num_experts,)
        self._tokens: dict[int, int] = {}
        self._batches_per_layer: dict[int, int] = {}
        self._routed: set[ExpertId] = set()
        self._updated: set[ExpertId] = set()
        self._num_batches = 0

    def add(self, stats: BatchStats, selected: Iterable[ExpertId] = ()) -> None:
        """Consume one batch's statistics and the experts trained on it (its E_active).

        Raises:
            AlgorithmError: a layer changed its number of experts, or a selected expert is not
                an expert of the batch's layers.
        """
        selected = frozenset(selected)
        for e in selected:
            if e.layer_idx not in stats.s_b or not 0 <= e.expert_idx < stats.num_experts(e.layer_idx):
                raise AlgorithmError(f"selected expert {e} is not in the batch's layers")
        for layer_idx in stats.layers:  # validate every layer before changing any sum
            known = self._gate_sum.get(layer_idx)
            if known is not None and known.shape[0] != stats.num_experts(layer_idx):
                raise AlgorithmError(f"layer {layer_idx}: {stats.num_experts(layer_idx)} experts, "
                                     f"earlier batches had {known.shape[0]}")
        for layer_idx in stats.layers:
            gate_sum = stats.gate_sum[layer_idx].detach().to(torch.float64)  # (num_experts,)
            s_b = stats.s_b[layer_idx].detach().to(torch.float64)  # (num_experts,)
            if layer_idx in self._gate_sum:
                self._gate_sum[layer_idx] += gate_sum
                self._s_b_sum[layer_idx] += s_b
            else:
                self._gate_sum[layer_idx] = gate_sum.clone()
                self._s_b_sum[layer_idx] = s_b.clone()
            self._tokens[layer_idx] = self._tokens.get(layer_idx, 0) + stats.num_tokens[layer_idx]
            self._batches_per_layer[layer_idx] = self._batches_per_layer.get(layer_idx, 0) + 1
        self._routed.update(stats.routed)
        self._updated.update(selected)
        self._num_batches += 1

    @property
    def num_batches(self) -> int:
        """Batches added so far."""
        return self._num_batches

    def result(self) -> RoundStats:
        """The round's :class:`RoundStats` (Eq. 16 usage, mean s_b importance).

        Raises:
            AlgorithmError: no batch was added.
        """
        if not self._num_batches:
            raise AlgorithmError("no batch statistics were added this round")
        usage: dict[ExpertId, float] = {}
        importance: dict[ExpertId, float] = {}
        for layer_idx in sorted(self._gate_sum):
            mean_gate = self._gate_sum[layer_idx] / self._tokens[layer_idx]  # (num_experts,)
            mean_s_b = self._s_b_sum[layer_idx] / self._batches_per_layer[layer_idx]  # (num_experts,)
            for e, (u, s) in enumerate(zip(mean_gate.tolist(), mean_s_b.tolist(), strict=True)):
                usage[ExpertId(layer_idx, e)] = u
                importance[ExpertId(layer_idx, e)] = s
        return RoundStats(usage=usage, importance=importance, routed=frozenset(self._routed),
                          updated=frozenset(self._updated), num_tokens=dict(self._tokens),
                          num_batches=self._num_batches)
