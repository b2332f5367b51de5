"""Budgeted selection (Eq. 15), its tie-breaking and budget scopes, and the baselines' rules.

Worked example (see tests/hfedmoe/test_importance.py for the numbers): routed experts and their scores

    expert   I_b (Eq. 14)      s_b (Eq. 5)
    (0,0)    0.43537626        0.4375
    (0,1)    0.5               0.5
    (0,2)    0.17883566        0.1875     <- not routed: never a candidate
    (1,0)    0.69660202        0.7
    (1,1)    0.49476752        0.5

I_b order: (1,0) > (0,1) > (1,1) > (0,0).  s_b order: (1,0) > (0,1) = (1,1) > (0,0), and the tie
(0,1) = (1,1) goes to the lower layer, (0,1).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hfedmoe.config import MethodConfig
from hfedmoe.errors import AlgorithmError, ConfigError
from hfedmoe.importance import BatchStats, compute_batch_stats
from hfedmoe.names import ExpertId
from hfedmoe.round_stats import RoundAccumulator
from hfedmoe.selection import (
    fedmoe_assignment,
    rank_experts,
    select_all,
    select_experts,
    select_fixed,
    select_random,
    selection_generator,
    specificity_scores,
    standardize_per_layer,
)

CFG = MethodConfig(lam=0.5, beta=0.1, layer_scale="raw")  # Eq. 15 on the raw scores
E = ExpertId


def _stats() -> BatchStats:
    g0 = torch.tensor([[0.5, 0.5, 0.0], [0.25, 0.5, 0.25]], dtype=torch.float64)
    g1 = torch.tensor([[0.8, 0.2], [0.4, 0.6]], dtype=torch.float64)
    return compute_batch_stats({0: g0, 1: g1}, {0: torch.tensor([[0], [1]]),
                                                1: torch.tensor([[0], [1]])}, CFG)


@pytest.mark.parametrize("budget, expected", [
    (0, set()),
    (1, {E(1, 0)}),
    (2, {E(1, 0), E(0, 1)}),
    (3, {E(1, 0), E(0, 1), E(1, 1)}),
    (4, {E(1, 0), E(0, 1), E(1, 1), E(0, 0)}),
    (99, {E(1, 0), E(0, 1), E(1, 1), E(0, 0)}),  # budget >= |E_union|: all routed
])
def test_select_by_ib(budget, expected):
    sel = select_experts(_stats(), budget, CFG)
    assert sel.experts == expected
    assert sel.key == "ib" and sel.budget == budget
    assert set(sel.scores) == {E(0, 0), E(0, 1), E(1, 0), E(1, 1)}
    assert sel.scores[E(0, 1)] == pytest.approx(0.5)


def test_select_by_importance_breaks_ties_by_layer():
    cfg = dataclasses.replace(CFG, selection_key="importance")
    assert select_experts(_stats(), 2, cfg).experts == {E(1, 0), E(0, 1)}


def test_ties_are_deterministic_whatever_the_insertion_order():
    scores = {E(2, 0): 0.5, E(0, 3): 0.5, E(1, 1): 0.9, E(0, 1): 0.5}
    reversed_scores = dict(reversed(list(scores.items())))
    expected = [E(1, 1), E(0, 1), E(0, 3), E(2, 0)]
    assert rank_experts(scores) == expected
    assert rank_experts(reversed_scores) == expected


def test_per_layer_cap_in_global_scope():
    # cap 1, budget 3: (1,0) kept, (0,1) kept, (1,1) and (0,0) skipped (their layers are full).
    cfg = dataclasses.replace(CFG, per_layer_cap=1)
    assert select_experts(_stats(), 3, cfg).experts == {E(1, 0), E(0, 1)}


def test_per_layer_scope_splits_the_budget():
    # budget 3 over 2 layers: quotas layer 0 -> 2, layer 1 -> 1.
    cfg = dataclasses.replace(CFG, budget_scope="per-layer")
    assert select_experts(_stats(), 3, cfg).experts == {E(0, 1), E(0, 0), E(1, 0)}
    assert select_experts(_stats(), 1, cfg).experts == {E(0, 1)}
    capped = dataclasses.replace(cfg, per_layer_cap=1)
    assert select_experts(_stats(), 4, capped).experts == {E(0, 1), E(1, 0)}


def test_selection_per_layer_view():
    sel = select_experts(_stats(), 3, CFG)
    assert sel.per_layer() == {0: (1,), 1: (0, 1)}
    assert len(sel) == 3


@pytest.mark.parametrize("budget", [-1, 1.5, True])
def test_bad_budget_raises(budget):
    with pytest.raises(AlgorithmError):
        select_experts(_stats(), budget, CFG)


def test_select_all_and_fixed_and_random():
    stats = _stats()
    assert select_all(stats).experts == {E(0, 0), E(0, 1), E(0, 2), E(1, 0), E(1, 1)}
    assert select_fixed(stats, {E(0, 2), E(1, 1)}).experts == {E(1, 1)}  # (0,2) not routed
    a = select_random(stats, 2, selection_generator(0, "phone-1", 3))
    b = select_random(stats, 2, selection_generator(0, "phone-1", 3))
    assert a.experts == b.experts and len(a) == 2
    assert a.experts <= stats.routed  # drawn among the routed experts, as HFedMoE's are
    assert select_random(stats, 9, selection_generator(0, "x", 0)).experts == stats.routed
    assert select_random(stats, 0, selection_generator(0, "x", 0)).experts == frozenset()


def test_routing_frequency_counts_routing_slots():
    stats = _stats()
    assert stats.routed_count[0].tolist() == [1, 1, 0]
    acc = RoundAccumulator()
    acc.add(stats)
    acc.add(stats)
    freq = acc.result().frequency
    assert freq[E(0, 0)] == pytest.approx(0.5) and freq[E(0, 2)] == 0.0


def test_layer_standardized_scores_share_one_scale():
    scores = {E(0, 0): 10.0, E(0, 1): 12.0, E(1, 0): 0.1, E(1, 1): 0.3}
    z = standardize_per_layer(scores)
    assert z[E(0, 1)] == pytest.approx(1.0) and z[E(1, 1)] == pytest.approx(1.0)
    assert z[E(0, 0)] == pytest.approx(-1.0)
    assert standardize_per_layer({E(0, 0): 3.0}) == {E(0, 0): 0.0}
    # raw: layer 0 wins both slots; standardized: each layer's best
    stats = _stats()
    raw = select_experts(stats, 2, CFG).experts
    std = select_experts(stats, 2, dataclasses.replace(CFG, layer_scale="standardized")).experts
    assert {e.layer_idx for e in std} == {0, 1} and len(raw) == 2


def test_fedmoe_assignment_top_usage_with_ties():
    usage = {E(0, 0): 0.5, E(0, 1): 0.2, E(1, 0): 0.5, E(1, 1): 0.1}
    assert fedmoe_assignment(usage, 2) == {E(0, 0), E(1, 0)}
    assert fedmoe_assignment(usage, 1) == {E(0, 0)}
    assert fedmoe_assignment(usage, 0) == frozenset()


# ---------------------------------------------------------------------------------------------
# Properties


@st.composite
def batches(draw):
    num_layers = draw(st.integers(1, 3))
    num_experts = draw(st.integers(1, 5))
    tokens = draw(st.integers(1, 6))
    top_k = draw(st.integers(1, num_experts))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    gates, routed = {}, {}
    for layer in range(num_layers):
        logits = torch.randn(tokens, num_experts, generator=gen)  # (tokens, num_experts)
        if draw(st.booleans()):
            logits = logits.round()  # many exact ties
        probs = logits.softmax(dim=-1)  # (tokens, num_experts)
        gates[layer] = probs
        routed[layer] = probs.topk(top_k, dim=-1).indices  # (tokens, top_k)
    return compute_batch_stats(gates, routed, CFG)


@settings(max_examples=50, deadline=None)
@given(stats=batches(), budget=st.integers(0, 12), key=st.sampled_from(["ib", "importance"]),
       cap=st.integers(0, 3), scope=st.sampled_from(["global", "per-layer"]))
def test_selection_respects_budget_and_routing(stats, budget, key, cap, scope):
    cfg = dataclasses.replace(CFG, selection_key=key, per_layer_cap=cap, budget_scope=scope)
    sel = select_experts(stats, budget, cfg)
    assert len(sel.experts) <= budget
    assert sel.experts <= stats.routed
    if cap:
        assert all(len(ids) <= cap for ids in sel.per_layer().values())
    if scope == "global" and not cap:
        assert len(sel.experts) == min(budget, len(stats.routed))
        scores = stats.scores(key)
        left = stats.routed - sel.experts
        if sel.experts and left:  # optimality of the sort: no better expert was left out
            assert min(scores[e] for e in sel.experts) >= max(scores[e] for e in left)
    assert select_experts(stats, budget, cfg) == sel  # deterministic


# --- the client-specificity term (method.specificity) -------------------------------------------
def test_specificity_is_each_experts_share_of_the_divergence_from_the_prior():
    usage = {E(0, 0): 0.5, E(0, 1): 0.1}
    prior = {E(0, 0): 0.25, E(0, 1): 0.1}
    spec = specificity_scores(usage, prior)
    assert spec[E(0, 0)] == pytest.approx(0.5 * math.log(2.0))  # twice the clients' average
    assert spec[E(0, 1)] == pytest.approx(0.0, abs=1e-9)  # exactly the average
    assert specificity_scores({E(0, 0): 0.1}, {E(0, 0): 0.4})[E(0, 0)] < 0  # used less
    # an expert the prior does not know takes the layer's mean prior: neither bonus nor penalty
    # beyond its usage against that mean
    new = specificity_scores({E(0, 2): 0.175}, prior)
    assert new[E(0, 2)] == pytest.approx(0.0, abs=1e-9)


def _client(g0: list[list[float]]) -> BatchStats:
    gates = torch.tensor(g0, dtype=torch.float64)
    routed = gates.argsort(dim=1, descending=True)[:, :2]
    return compute_batch_stats({0: gates}, {0: routed}, MethodConfig())


# two clients whose tokens route alike to the popular experts 0 and 1, and each to one expert
# the other client never uses: expert 2 (client a), expert 3 (client b)
A = _client([[0.5, 0.3, 0.2, 0.0], [0.45, 0.35, 0.2, 0.0], [0.35, 0.3, 0.35, 0.0]])
B = _client([[0.5, 0.3, 0.0, 0.2], [0.45, 0.35, 0.0, 0.2], [0.35, 0.3, 0.0, 0.35]])


def test_without_a_prior_two_different_clients_pick_the_same_popular_experts():
    cfg = MethodConfig(specificity=1.0)
    a, b = select_experts(A, 2, cfg), select_experts(B, 2, cfg)
    assert a.experts == b.experts == {E(0, 0), E(0, 1)}


def test_with_the_global_prior_each_client_picks_the_expert_its_data_wants():
    prior = {E(0, i): v for i, v in enumerate((0.42, 0.35, 0.12, 0.11))}
    cfg = MethodConfig(specificity=1.0)
    a, b = select_experts(A, 2, cfg, prior), select_experts(B, 2, cfg, prior)
    assert E(0, 2) in a.experts and E(0, 3) in b.experts
    assert len(a.experts & b.experts) == 1
    # specificity 0 is the paper's rule: the prior changes nothing
    paper = MethodConfig(specificity=0.0)
    assert select_experts(A, 2, paper, prior).experts == select_experts(A, 2, paper).experts


def test_anti_selection_keeps_the_bottom_of_the_same_score():
    cfg = MethodConfig()
    top = select_experts(A, 1, cfg)
    bottom = select_experts(A, 1, cfg, reverse=True)
    assert not top.experts & bottom.experts and len(bottom) == 1
    assert bottom.experts <= A.routed


def test_specificity_must_be_a_finite_number_at_least_zero():
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="method.specificity"):
            MethodConfig(specificity=bad)
    with pytest.raises(ConfigError, match="method.gate_weighting"):
        MethodConfig(gate_weighting="votes")
