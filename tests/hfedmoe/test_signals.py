"""The method's signals, on hand-computed cases."""

import pytest

from hfedmoe.names import ExpertId
from hfedmoe.signals import ranking_disagreement, round_signals

E = ExpertId


def test_ranking_disagreement_counts_the_share_that_differs():
    ib = {E(0, 0): 0.9, E(0, 1): 0.8, E(0, 2): 0.1}
    imp = {E(0, 0): 0.9, E(0, 1): 0.1, E(0, 2): 0.8}
    assert ranking_disagreement(ib, imp, 2) == pytest.approx(0.5)
    assert ranking_disagreement(ib, ib, 2) == 0.0
    assert ranking_disagreement(ib, imp, 0) == 0.0


def test_round_signals():
    usage = {"a": {E(0, 0): 0.9, E(0, 1): 0.1}, "b": {E(0, 0): 0.5, E(0, 1): 0.005}}
    reports = {"a": {"updated": ["0:0", "0:1"], "aggregated": ["0:0", "0:1"], "alpha": 0.75},
               "b": {"updated": ["0:0", "0:1"], "aggregated": ["0:0"], "alpha": 0.25}}
    s = round_signals(reports, usage, {"a": 0.5, "b": 0.0}, tau=0.01)
    # std across clients: expert 0 -> 0.2, expert 1 -> 0.0475; mean 0.12375
    assert s["usage_spread"] == pytest.approx(0.12375)
    assert (s["tau_removed"], s["tau_removed_clients"]) == (1, 1)
    assert s["below_tau"] == pytest.approx(0.25)  # b's expert 1 of 4 client-experts
    assert (s["alpha_min"], s["alpha_max"]) == (0.25, 0.75)
    assert s["alpha_cv"] == pytest.approx(0.5)
    assert s["ib_disagreement"] == pytest.approx(0.25)


@pytest.mark.slow
def test_signals_are_alive_on_the_default_model():
    """On the default (MoEfied) model, at the default beta, before any training: IB changes
    the budgeted choice on most of 10 clients, and tau at 0.4 of the uniform share 1/S (0.05 at
    8 experts per layer) removes experts from aggregation at Dirichlet 0.1 (the copy-upcycled
    model does neither at the paper's values). The default tau, the paper's 0.01, removes none
    at 8 experts per layer; it was chosen at 32 (docs/method.md, "Defaults").
    """
    import argparse

    from benchmarks.signals import measure
    from hfedmoe.config import MethodConfig, ModelConfig

    m, model = MethodConfig(), ModelConfig()
    args = argparse.Namespace(seed=0, devices=10, batches=4, budget=12, tau=0.4 / 8, beta=m.beta,
                              num_experts=model.num_experts, top_k=model.top_k, max_length=64,
                              model=model.name)
    r = measure(model.upcycle, 0.1, args)
    assert r["clients"] == 10
    assert r["ib_disagreement"] > 0.05 and r["clients_with_disagreement"] >= 5
    assert r["tau_removed"] > 0 and r["tau_removed_clients"] >= 1
    assert r["usage_max"] > 3 * r["usage_min"]  # experts are used very differently
    # standardized layer scale: every layer gets a share of the budget
    assert min(r["layer_share_standardized"]) > 0.0
    assert measure(model.upcycle, 0.1, args) == r  # the MoEfied build is reproducible
