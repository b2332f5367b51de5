"""The sparse update a client sends after a round: deltas of what it trained, plus statistics.

This is the value the algorithm core aggregates and the wire format encodes
(:mod:`hfedmoe.wire`). Tensor keys are canonical names (:mod:`hfedmoe.names`); only the experts a
client actually updated are present (METHOD.md section 5).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from hfedmoe.names import ExpertId


@dataclass(frozen=True)
class SparseUpdate:
    """One client's update for one round.

    Attributes:
        run_id: the federated run this update belongs to.
        round_idx: the round it was trained in.
        client_id: the sending device.
        num_examples: |D_c|, the examples trained on this round (data-size weight).
        deltas: canonical key -> (trained - global) tensor; experts, gates, shared parts.
        usage: u_c(e) (Eq. 16) for every expert the client's data reached (absent: 0).
        importance: s^c(e), the mean of s_b(e) (Eq. 5) over the client's batches.
        routed: experts some token was routed to (forward).
        updated: experts that received gradients (backward), i.e. union of E_active.
        base_model_hash: hash of the global model the deltas are relative to.
        meta: free-form JSON-able extras (loss, steps, timings).
    """

    run_id: str
    round_idx: int
    client_id: str
    num_examples: int
    deltas: Mapping[str, torch.Tensor]
    usage: Mapping[ExpertId, float] = field(default_factory=dict)
    importance: Mapping[ExpertId, float] = field(default_factory=dict)
    routed: frozenset[ExpertId] = frozenset()
    updated: frozenset[ExpertId] = frozenset()
    base_model_hash: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)

    def aggregated(self, tau: float) -> frozenset[ExpertId]:
        """Experts this client contributes to aggregation: updated and u_c(e) >= tau (Eq. 17)."""
        return frozenset(e for e in self.updated if self.usage.get(e, 0.0) >= tau)
