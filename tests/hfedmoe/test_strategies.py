"""Strategy registry: one interface for HFedMoE, its ablations and the baselines; plus DP."""

from __future__ import annotations

import math

import pytest
import torch

from hfedmoe.config import MethodConfig
from hfedmoe.errors import AlgorithmError, ConfigError
from hfedmoe.importance import compute_batch_stats
from hfedmoe.names import ExpertId
from hfedmoe.privacy import (
    epsilon,
    os_gaussian,
    privatize,
    privatize_with_config,
    rounds_within,
    update_norm,
)
from hfedmoe.round_stats import RoundAccumulator
from hfedmoe.selection import selection_generator
from hfedmoe.strategies import REGISTRY, get_strategy
from hfedmoe.update import SparseUpdate

E = ExpertId
NAMES = ["budget-zero", "fedavg-full", "fedavg-random", "fedmoe", "hfedmoe", "hfedmoe-anti",
         "hfedmoe-importance", "hfedmoe-other", "hfedmoe-paper", "hfedmoe-uniform"]


def _stats():
    # Layer 0 of the worked example in tests/hfedmoe/test_importance.py: routed {(0,0), (0,1)};
    # I_b = [0.43537626, 0.5, 0.17883566], s_b = [0.4375, 0.5, 0.1875].
    g = torch.tensor([[0.5, 0.5, 0.0], [0.25, 0.5, 0.25]], dtype=torch.float64)
    return compute_batch_stats({0: g}, {0: torch.tensor([[0], [1]])}, MethodConfig())


def test_registry_names_and_unknown_name():
    assert sorted(REGISTRY) == NAMES
    with pytest.raises(ConfigError) as info:
        get_strategy("fedprox")
    assert all(name in str(info.value) for name in NAMES)


def test_name_defaults_to_config_and_config_follows_name():
    assert get_strategy(cfg=MethodConfig(strategy="fedmoe")).name == "fedmoe"
    strat = get_strategy("hfedmoe-importance", MethodConfig(beta=0.3))
    assert strat.cfg.selection_key == "importance" and strat.cfg.beta == 0.3
    assert strat.cfg.strategy == "hfedmoe-importance"


def test_aggregation_rules_per_strategy():
    cfg = MethodConfig(tau=0.05)
    full = get_strategy("hfedmoe", cfg).rule
    assert (full.expert_weighting, full.gate_weighting, full.tau) == \
        ("usage-threshold", "importance", 0.05)
    assert get_strategy("hfedmoe-importance", cfg).rule == full
    for name in ("hfedmoe-uniform", "fedavg-full", "fedavg-random", "fedmoe"):
        rule = get_strategy(name, cfg).rule
        assert (rule.expert_weighting, rule.gate_weighting) == ("data-size", "data-size")


def test_select_for_every_strategy():
    stats = _stats()
    assert get_strategy("hfedmoe").select(stats, 1).experts == {E(0, 1)}
    assert get_strategy("hfedmoe-importance").select(stats, 1).experts == {E(0, 1)}
    assert get_strategy("hfedmoe-uniform").select(stats, 5).experts == {E(0, 0), E(0, 1)}
    full = get_strategy("fedavg-full")
    assert not full.uses_budget
    assert full.select(stats, 0).experts == {E(0, 0), E(0, 1), E(0, 2)}
    rnd = get_strategy("fedavg-random")
    assert rnd.needs_generator
    first = rnd.select(stats, 2, generator=selection_generator(7, "c1", 0))
    again = rnd.select(stats, 2, generator=selection_generator(7, "c1", 0))
    assert first.experts == again.experts and len(first) == 2
    fedmoe = get_strategy("fedmoe")
    assert fedmoe.needs_assignment
    assignment = fedmoe.assign({E(0, 0): 0.1, E(0, 1): 0.2, E(0, 2): 0.7}, 2)
    assert assignment == {E(0, 2), E(0, 1)}
    assert fedmoe.select(stats, 2, assignment=assignment).experts == {E(0, 1)}  # (0,2) unrouted
    assert get_strategy("hfedmoe").assign({E(0, 0): 1.0}, 1) is None


def test_missing_generator_or_assignment_raises():
    with pytest.raises(AlgorithmError):
        get_strategy("fedavg-random").select(_stats(), 1)
    with pytest.raises(AlgorithmError):
        get_strategy("fedmoe").select(_stats(), 1)


@pytest.mark.parametrize("name", NAMES)
def test_one_round_end_to_end_streaming_equals_batch(name):
    strat = get_strategy(name, MethodConfig(tau=0.01))
    key = "layers.0.experts.{}.w"
    glob = {key.format(e): torch.zeros(2, dtype=torch.float64) for e in range(3)}
    glob["layers.0.gate.weight"] = torch.zeros(3, dtype=torch.float64)
    updates = []
    for c, n in (("a", 2), ("b", 6)):
        acc = RoundAccumulator()
        stats = _stats()
        assignment = strat.assign({E(0, 0): 0.6, E(0, 1): 0.3, E(0, 2): 0.1}, 1)
        sel = strat.select(stats, 1, generator=selection_generator(0, c, 0), assignment=assignment)
        acc.add(stats, sel.experts)
        rs = acc.result()
        deltas = {key.format(e.expert_idx): torch.full((2,), float(n), dtype=torch.float64)
                  for e in rs.updated}
        deltas["layers.0.gate.weight"] = torch.full((3,), float(n), dtype=torch.float64)
        updates.append(SparseUpdate("r", 0, c, n, deltas, rs.usage, rs.importance, rs.routed,
                                    rs.updated))
    agg = strat.make_aggregator()
    for u in updates:
        agg.add(u)
    stream, batch = agg.finalize(glob), strat.aggregate(glob, updates)
    for k in glob:
        torch.testing.assert_close(stream[k], batch[k])


# ---------------------------------------------------------------------------------------------
# Differential privacy


def test_dp_clips_the_whole_update_by_hand():
    # ||[3, 0, 0, 4]|| = 5; clip 2.5 -> scale 0.5.
    deltas = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([0.0, 4.0])}
    out = privatize(deltas, clip=2.5, noise_multiplier=0.0)
    assert out.norm == 5.0 and out.scale == 0.5 and out.noise_std == 0.0
    assert out.deltas["a"].tolist() == [1.5, 0.0] and out.deltas["b"].tolist() == [0.0, 2.0]
    assert privatize(deltas, clip=10.0, noise_multiplier=0.0).deltas["a"].tolist() == [3.0, 0.0]


def test_dp_off_by_default_and_noise_comes_from_the_os():
    deltas = {"a": torch.zeros(20000)}
    off = privatize_with_config(deltas, MethodConfig())
    assert off.deltas["a"] is deltas["a"]
    cfg = MethodConfig(dp_clip=1.0, dp_noise_multiplier=0.5)
    one = privatize_with_config(deltas, cfg)
    two = privatize_with_config(deltas, cfg)
    assert not torch.equal(one.deltas["a"], two.deltas["a"])  # nothing seeds it
    assert one.noise_std == 0.5
    for out in (one, two):
        std = float(out.deltas["a"].std())
        assert abs(std - 0.5) < 0.02  # 20000 draws: the sample std is within ~1% of 0.5
        assert abs(float(out.deltas["a"].mean())) < 0.02
    # the test-only switch: an explicit seeded generator reproduces the noise
    seeded = [privatize_with_config(deltas, cfg, torch.Generator().manual_seed(3)) for _ in "ab"]
    assert torch.equal(seeded[0].deltas["a"], seeded[1].deltas["a"])
    assert math.isclose(update_norm({"x": torch.tensor([6.0, 8.0])}), 10.0)


def test_os_gaussian_is_standard_normal():
    z = os_gaussian((200_000,), torch.float64)
    assert z.dtype == torch.float64 and torch.isfinite(z).all()
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    tail = float((z.abs() > 1.96).double().mean())
    assert abs(tail - 0.05) < 0.003  # two-sided 5% tail


def test_epsilon_composes_rounds_with_the_rdp_accountant():
    assert epsilon(1.0, 0, 1e-5) == 0.0 and epsilon(0.0, 3, 1e-5) == math.inf
    eps = [epsilon(1.0, r, 1e-5) for r in (1, 10, 100)]
    assert eps[0] < eps[1] < eps[2]
    # one Gaussian mechanism: RDP alpha/(2 z^2), converted at delta (Opacus' rdp conversion);
    # more noise spends less
    assert epsilon(2.0, 10, 1e-5) < eps[1]
    n = rounds_within(1.0, 10.0, 1e-5)
    assert epsilon(1.0, n, 1e-5) <= 10.0 < epsilon(1.0, n + 1, 1e-5)
    with pytest.raises(AlgorithmError):
        epsilon(1.0, 1, 0.0)


def test_dp_bad_arguments_raise():
    deltas = {"a": torch.ones(2)}
    with pytest.raises(AlgorithmError):
        privatize(deltas, clip=0.0, noise_multiplier=1.0)
    with pytest.raises(AlgorithmError):
        privatize({"a": torch.tensor([math.inf])}, clip=1.0, noise_multiplier=0.0)


@pytest.mark.parametrize("gates", ["importance", "importance-size", "data-size"])
def test_every_gate_weighting_builds_the_hfedmoe_rule(gates):
    strategy = get_strategy("hfedmoe", MethodConfig(gate_weighting=gates))
    assert strategy.rule.gate_weighting == gates
    assert strategy.make_aggregator() is not None
