"""Batch statistics (Eq. 3-5, 10, 11, 14) and round accumulation (Eq. 16) on hand-made tensors.

Worked example used throughout (lam = 0.5, beta = 0.1), layer 0, two tokens, three experts::

    G = [[0.50, 0.50, 0.00],
         [0.25, 0.50, 0.25]]          routed (top-1): token 0 -> e0, token 1 -> e1

    s_cumul    = [0.375, 0.5, 0.125]                           (Eq. 3, = p(z_e) Eq. 10)
    s_specific = [0.5,   0.5, 0.25 ]                           (Eq. 4)
    s_b        = [0.4375, 0.5, 0.1875]                         (Eq. 5)
    KL(e0) = 1/2 (0.5 ln(0.5/0.375) + 0.25 ln(0.25/0.375))
           = 1/2 (0.5 * 0.2876820724517809 - 0.25 * 0.4054651081081644) = 0.0212373795995
    KL(e1) = 1/2 (0.5 ln 1 + 0.5 ln 1) = 0
    KL(e2) = 1/2 (0 + 0.25 ln(0.25/0.125)) = 0.125 ln 2 = 0.0866433975699932   (G=0 term is 0)
    I_b    = [0.4375 - 0.00212373795995, 0.5, 0.1875 - 0.00866433975700]
           = [0.43537626204005, 0.5, 0.17883566024300]            (Eq. 14)

Layer 1, two tokens, two experts::

    G = [[0.8, 0.2], [0.4, 0.6]]      routed: token 0 -> e0, token 1 -> e1
    s_cumul = [0.6, 0.4]; s_specific = [0.8, 0.6]; s_b = [0.7, 0.5]
    KL(e0) = 1/2 (0.8 ln(4/3) + 0.4 ln(2/3)) = 1/2 (0.23014565796 - 0.16218604324) = 0.03397980736
    KL(e1) = 1/2 (0.2 ln(1/2) + 0.6 ln(3/2)) = 1/2 (-0.13862943611 + 0.24327906487) = 0.05232481438
    I_b = [0.696602019264, 0.494767518562]
"""

from __future__ import annotations

import math

import pytest
import torch

from hfedmoe.config import MethodConfig
from hfedmoe.errors import AlgorithmError
from hfedmoe.importance import (
    compute_batch_stats,
    ib_score,
    importance_score,
    kl_term,
    marginal_activation,
    s_cumul,
    s_specific,
)
from hfedmoe.names import ExpertId
from hfedmoe.round_stats import RoundAccumulator

CFG = MethodConfig(lam=0.5, beta=0.1)
G0 = torch.tensor([[0.5, 0.5, 0.0], [0.25, 0.5, 0.25]], dtype=torch.float64)
R0 = torch.tensor([[0], [1]])
G1 = torch.tensor([[0.8, 0.2], [0.4, 0.6]], dtype=torch.float64)
R1 = torch.tensor([[0], [1]])


def _close(t: torch.Tensor, expected: list[float]) -> None:
    assert t.tolist() == pytest.approx(expected, abs=1e-10)


def test_equation_functions_on_layer0():
    _close(s_cumul(G0), [0.375, 0.5, 0.125])
    _close(s_specific(G0), [0.5, 0.5, 0.25])
    _close(importance_score(G0, 0.5), [0.4375, 0.5, 0.1875])
    _close(marginal_activation(G0), [0.375, 0.5, 0.125])
    _close(kl_term(G0), [0.0212373795995, 0.0, 0.0866433975699932])
    _close(ib_score(G0, 0.5, 0.1), [0.43537626204005, 0.5, 0.17883566024300])


def test_lam_extremes_select_one_term():
    _close(importance_score(G0, 1.0), [0.375, 0.5, 0.125])
    _close(importance_score(G0, 0.0), [0.5, 0.5, 0.25])


def test_batch_stats_two_layers():
    stats = compute_batch_stats({0: G0, 1: G1}, {0: R0, 1: R1}, CFG)
    assert stats.layers == (0, 1)
    _close(stats.s_cumul[1], [0.6, 0.4])
    _close(stats.s_specific[1], [0.8, 0.6])
    _close(stats.s_b[1], [0.7, 0.5])
    _close(stats.kl[1], [0.03397980736, 0.05232481438])
    _close(stats.ib[1], [0.696602019264, 0.494767518562])
    _close(stats.ib[0], [0.43537626204005, 0.5, 0.17883566024300])
    _close(stats.p_z[0], [0.375, 0.5, 0.125])
    _close(stats.gate_sum[0], [0.75, 1.0, 0.25])
    assert stats.num_tokens == {0: 2, 1: 2}
    assert stats.routed == {ExpertId(0, 0), ExpertId(0, 1), ExpertId(1, 0), ExpertId(1, 1)}
    assert stats.scores("importance")[ExpertId(1, 0)] == pytest.approx(0.7)
    assert ExpertId(0, 2) not in stats.scores("ib")  # not routed: not a candidate


def test_token_mask_drops_padding():
    padded = torch.cat([G0, torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)])  # (3, 3)
    routed = torch.tensor([[0], [1], [2]])
    stats = compute_batch_stats({0: padded}, {0: routed}, CFG,
                                token_mask={0: torch.tensor([True, True, False])})
    _close(stats.ib[0], [0.43537626204005, 0.5, 0.17883566024300])
    assert stats.num_tokens == {0: 2}
    assert ExpertId(0, 2) not in stats.routed


def test_zero_gate_scores_give_finite_values():
    # e1 is never activated: p(z_e1) = 0; both log arguments are guarded -> KL = 0, no NaN.
    gates = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    kl = kl_term(gates)
    assert torch.isfinite(kl).all()
    _close(kl, [0.0, 0.0])
    _close(ib_score(gates, 0.5, 0.1), [1.0, 0.0])


def test_float32_input_is_computed_in_float32():
    stats = compute_batch_stats({0: G0.float()}, {0: R0}, CFG)
    assert stats.ib[0].dtype == torch.float32
    assert stats.ib[0].tolist() == pytest.approx([0.43537626, 0.5, 0.17883566], abs=1e-6)


@pytest.mark.parametrize("gates, routed", [
    (G0, torch.tensor([[0]])),                      # token counts differ
    (G0, torch.tensor([[0], [3]])),                 # index outside [0, num_experts)
    (G0, torch.tensor([[0.0], [1.0]])),             # float indices
    (G0[0], R0),                                    # 1-D gate scores
    (-G0, R0),                                      # negative probabilities
    (torch.full((2, 3), math.nan), R0),             # non-finite
])
def test_bad_inputs_raise_algorithm_error(gates, routed):
    with pytest.raises(AlgorithmError):
        compute_batch_stats({0: gates}, {0: routed}, CFG)


def test_mismatched_layers_and_masks_raise():
    with pytest.raises(AlgorithmError):
        compute_batch_stats({0: G0}, {1: R0}, CFG)
    with pytest.raises(AlgorithmError):
        compute_batch_stats({0: G0}, {0: R0}, CFG, token_mask={0: torch.tensor([1, 1])})
    with pytest.raises(AlgorithmError):
        compute_batch_stats({0: G0}, {0: R0}, CFG, token_mask={0: torch.tensor([False, False])})
    with pytest.raises(AlgorithmError):
        compute_batch_stats({}, {}, CFG)


def test_round_accumulator_usage_and_importance():
    # Batch 1: layer 0 of the worked example. Batch 2: one token, G = [0, 0, 1] routed to e2,
    # so s_b = [0, 0, 1]. Over the round (3 tokens):
    #   u = ([0.75, 1.0, 0.25] + [0, 0, 1]) / 3 = [0.25, 0.333.., 0.41666..]      (Eq. 16)
    #   s^c = ([0.4375, 0.5, 0.1875] + [0, 0, 1]) / 2 = [0.21875, 0.25, 0.59375]   (Decision)
    acc = RoundAccumulator()
    acc.add(compute_batch_stats({0: G0}, {0: R0}, CFG), [ExpertId(0, 1)])
    g2 = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    acc.add(compute_batch_stats({0: g2}, {0: torch.tensor([[2]])}, CFG), [ExpertId(0, 2)])
    rs = acc.result()
    e0, e1, e2 = ExpertId(0, 0), ExpertId(0, 1), ExpertId(0, 2)
    assert [rs.usage[e] for e in (e0, e1, e2)] == pytest.approx([0.25, 1 / 3, 1.25 / 3])
    assert [rs.importance[e] for e in (e0, e1, e2)] == pytest.approx([0.21875, 0.25, 0.59375])
    assert rs.routed == {e0, e1, e2}
    assert rs.updated == {e1, e2}
    assert rs.aggregated(0.3) == {e1, e2}
    assert rs.aggregated(0.35) == {e2}
    assert rs.usage_set(0.3) == {e1, e2}
    assert rs.num_tokens == {0: 3} and rs.num_batches == 2


def test_round_accumulator_rejects_inconsistent_input():
    acc = RoundAccumulator()
    with pytest.raises(AlgorithmError):
        acc.result()  # nothing added
    acc.add(compute_batch_stats({0: G0}, {0: R0}, CFG))
    with pytest.raises(AlgorithmError):  # layer 0 now has 2 experts instead of 3
        acc.add(compute_batch_stats({0: G1}, {0: R1}, CFG))
    with pytest.raises(AlgorithmError):  # selected expert outside the pool
        acc.add(compute_batch_stats({0: G0}, {0: R0}, CFG), [ExpertId(0, 7)])
