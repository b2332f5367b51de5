"""Hand-made global states and sparse updates for the secure-aggregation tests."""

from __future__ import annotations

import random

import torch

from hfedmoe.names import ExpertId
from hfedmoe.update import SparseUpdate

LAYERS, EXPERTS = 2, 4


def global_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {}
    for layer in range(LAYERS):
        for e in range(EXPERTS):
            state[f"layers.{layer}.experts.{e}.w1"] = torch.randn(4, 3, generator=g)
            state[f"layers.{layer}.experts.{e}.w2"] = torch.randn(3, 4, generator=g)
        state[f"layers.{layer}.gate.weight"] = torch.randn(EXPERTS, 3, generator=g)
    state["shared.head.weight"] = torch.randn(2, 3, generator=g)
    return state


def make_update(client: str, experts: list[ExpertId], state: dict[str, torch.Tensor],
                seed: int, num_examples: int | None = None, low_usage: tuple[ExpertId, ...] = ()
                ) -> SparseUpdate:
    """An update that trained ``experts`` (usage below tau for ``low_usage``), the gates of
    every layer and the shared head."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for e in experts:
        for p in ("w1", "w2"):
            key = f"layers.{e.layer_idx}.experts.{e.expert_idx}.{p}"
            deltas[key] = 0.05 * torch.randn(state[key].shape, generator=g)
    for key in state:
        if ".gate." in key or key.startswith("shared."):
            deltas[key] = 0.05 * torch.randn(state[key].shape, generator=g)
    usage = {e: (0.001 if e in low_usage else rng.uniform(0.05, 0.5)) for e in experts}
    importance = {e: rng.uniform(0.1, 1.0) for e in experts}
    return SparseUpdate("run", 0, client, num_examples or rng.randint(10, 500), deltas,
                        usage=usage, importance=importance, routed=frozenset(experts),
                        updated=frozenset(experts))


def ten_clients(state: dict[str, torch.Tensor]) -> list[SparseUpdate]:
    """Ten updates: experts 0:0..0:2 and 1:0..1:1 trained by many, 0:3 by exactly two
    (below k = 3), 1:3 by one; 1:2 by three (c0, c1, c2)."""
    out = []
    for i in range(10):
        experts = [ExpertId(0, 0), ExpertId(0, 1 + i % 2), ExpertId(1, i % 2)]
        if i in (3, 4):
            experts.append(ExpertId(0, 3))
        if i == 5:
            experts.append(ExpertId(1, 3))
        if i in (0, 1, 2):
            experts.append(ExpertId(1, 2))
        out.append(make_update(f"c{i}", experts, state, seed=100 + i,
                               low_usage=(ExpertId(0, 0),) if i == 9 else ()))
    return out
