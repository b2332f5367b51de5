"""A client's statistics over one round: usage u_c(e) (Eq. 16) and importance s^c(e).

The device agent feeds :class:`RoundAccumulator` one :class:`~hfedmoe.importance.BatchStats`
(and the experts it trained on that batch) at a time; memory is O(num_experts), independent of
the number of batches.

- ``u_c(e)`` (Eq. 16) is the mean gate score of expert e over every unmasked token of the
  client's round that reached e's layer (for token-level routers "sample" means token).
- ``s^c(e)`` (METHOD.md Decision) is the mean of s_b(e) (Eq. 5) over the client's batches.
- ``ib(e)`` is the mean of I_b(e) (Eq. 14) over the batches; it ranks experts for the round's
  selection (Eq. 15 applied once per round, METHOD.md section 3, revised Decision).
- ``frequency(e)`` is the share of the layer's routing slots (token x top-k) that went to e:
  how often an expert is routed to, FedMoE's (Mei et al. 2024) activation statistic.
- ``expert_rows(e)`` is the mean number of token rows expert e computed per batch, padding
  included: the real (imbalanced) routing the cost model predicts a step from.
- Three sets are kept apart for logging: ``routed`` (forward), ``updated`` (backward: the union
  of the batches' E_active) and ``aggregated(tau)`` (updated with u_c(e) >= tau, Eq. 17).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

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
    ib: Mapping[ExpertId, float] = field(default_factory=dict)
    frequency: Mapping[ExpertId, float] = field(default_factory=dict)
    expert_rows: Mapping[ExpertId, float] = field(default_factory=dict)
    batch_rows: float = 0.0

    # The same selection interface as BatchStats, so a strategy selects on a round (Eq. 15).
    @property
    def layers(self) -> tuple[int, ...]:
        """MoE layer indices present, ascending."""
        return tuple(sorted({e.layer_idx for e in self.usage}))

    def num_experts(self, layer_idx: int) -> int:
        """Number of experts S of MoE layer ``layer_idx``."""
        return sum(1 for e in self.usage if e.layer_idx == layer_idx)

    def all_experts(self) -> tuple[ExpertId, ...]:
        """Every expert of the layers seen (the pool E), in (layer, expert) order."""
        return tuple(sorted(self.usage))

    def scores(self, key: str) -> dict[ExpertId, float]:
        """``{e: round score}`` over the routed experts: mean I_b ("ib") or mean s_b
        ("importance") over the round's batches."""
        table = {"ib": self.ib, "importance": self.importance}.get(key)
        if table is None:
            raise AlgorithmError(f"unknown selection key {key!r}; valid: ib, importance")
        return {e: float(table.get(e, 0.0)) for e in sorted(self.routed)}

    def with_updated(self, updated: Iterable[ExpertId]) -> RoundStats:
        """A copy whose ``updated`` set is ``updated``."""
        return dataclasses.replace(self, updated=frozenset(updated))

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
        self._ib_sum: dict[int, torch.Tensor] = {}  # layer -> (num_experts,)
        self._rows_sum: dict[int, torch.Tensor] = {}  # layer -> (num_experts,)
        self._count_sum: dict[int, torch.Tensor] = {}  # layer -> (num_experts,) routed tokens
        self._rows_batches = 0
        self._batch_rows = 0
        self._tokens: dict[int, int] = {}
        self._batches_per_layer: dict[int, int] = {}
        self._routed: set[ExpertId] = set()
        self._updated: set[ExpertId] = set()
        self._num_batches = 0

    def add(self, stats: BatchStats, selected: Iterable[ExpertId] = (),
            expert_rows: Mapping[int, torch.Tensor] | None = None, batch_rows: int = 0) -> None:
        """Consume one batch's statistics and the experts trained on it (its E_active).

        ``expert_rows`` (layer -> (num_experts,) rows computed, padding included, as
        :class:`~hfedmoe.models.base.GateCapture` records them) and ``batch_rows`` (the batch's
        padded token count) feed the cost model; both optional.

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
            ib = stats.ib[layer_idx].detach().to(torch.float64)  # (num_experts,)
            if layer_idx in self._gate_sum:
                self._gate_sum[layer_idx] += gate_sum
                self._s_b_sum[layer_idx] += s_b
                self._ib_sum[layer_idx] += ib
            else:
                self._gate_sum[layer_idx] = gate_sum.clone()
                self._s_b_sum[layer_idx] = s_b.clone()
                self._ib_sum[layer_idx] = ib.clone()
            self._tokens[layer_idx] = self._tokens.get(layer_idx, 0) + stats.num_tokens[layer_idx]
            self._batches_per_layer[layer_idx] = self._batches_per_layer.get(layer_idx, 0) + 1
        for layer_idx, count in stats.routed_count.items():
            count = count.detach().to(torch.float64).cpu()  # (num_experts,)
            prev = self._count_sum.get(layer_idx)
            self._count_sum[layer_idx] = count.clone() if prev is None else prev + count
        if expert_rows is not None:
            for layer_idx, rows in expert_rows.items():
                rows = rows.detach().to(torch.float64).cpu()  # (num_experts,)
                prev = self._rows_sum.get(layer_idx)
                self._rows_sum[layer_idx] = rows.clone() if prev is None else prev + rows
            self._rows_batches += 1
            self._batch_rows += int(batch_rows)
        self._routed.update(stats.routed)
        self._updated.update(selected)
        self._num_batches += 1

    def mark_updated(self, experts: Iterable[ExpertId]) -> None:
        """Record experts trained outside :meth:`add` (a round trained on a fixed set)."""
        self._updated.update(experts)

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
        ib: dict[ExpertId, float] = {}
        rows: dict[ExpertId, float] = {}
        freq: dict[ExpertId, float] = {}
        for layer_idx in sorted(self._gate_sum):
            n = self._batches_per_layer[layer_idx]
            mean_gate = self._gate_sum[layer_idx] / self._tokens[layer_idx]  # (num_experts,)
            mean_s_b = self._s_b_sum[layer_idx] / n  # (num_experts,)
            mean_ib = self._ib_sum[layer_idx] / n  # (num_experts,)
            for e, (u, s, i) in enumerate(zip(mean_gate.tolist(), mean_s_b.tolist(),
                                              mean_ib.tolist(), strict=True)):
                usage[ExpertId(layer_idx, e)] = u
                importance[ExpertId(layer_idx, e)] = s
                ib[ExpertId(layer_idx, e)] = i
            if layer_idx in self._count_sum:
                share = self._count_sum[layer_idx] / max(float(self._count_sum[layer_idx].sum()),
                                                         1.0)  # (num_experts,)
                for e, f in enumerate(share.tolist()):
                    freq[ExpertId(layer_idx, e)] = f
            if layer_idx in self._rows_sum and self._rows_batches:
                per_batch = self._rows_sum[layer_idx] / self._rows_batches  # (num_experts,)
                for e, r in enumerate(per_batch.tolist()):
                    rows[ExpertId(layer_idx, e)] = r
        return RoundStats(usage=usage, importance=importance, routed=frozenset(self._routed),
                          updated=frozenset(self._updated), num_tokens=dict(self._tokens),
                          num_batches=self._num_batches, ib=ib, frequency=freq,
                          expert_rows=rows,
                          batch_rows=self._batch_rows / max(self._rows_batches, 1))
