"""Bounded updates and robust aggregation (hfedmoe.robust) on hand-made tensors."""

from __future__ import annotations

import pytest
import torch

from hfedmoe.aggregation import AggregationRule, aggregate
from hfedmoe.aggregator import Aggregator
from hfedmoe.errors import AlgorithmError
from hfedmoe.names import ExpertId, expert_key, gate_key
from hfedmoe.robust import (
    clip_update,
    expert_norms,
    norm_bounded_mean,
    norm_violations,
    trim_count,
    trimmed_mean,
    update_norm,
)
from hfedmoe.update import SparseUpdate

E1, E2 = ExpertId(0, 1), ExpertId(0, 2)
K1, K2, G = expert_key(0, 1, "w_in"), expert_key(0, 2, "w_in"), gate_key(0, "weight")


def _update(client: str, deltas: dict, num_examples: int = 1) -> SparseUpdate:
    experts = frozenset(e for e, k in ((E1, K1), (E2, K2)) if k in deltas)
    return SparseUpdate("run", 0, client, num_examples, deltas, usage={e: 0.5 for e in experts},
                        importance={e: 0.5 for e in experts}, routed=experts, updated=experts)


# --- norms, clipping ---------------------------------------------------------------------------
def test_norms_of_an_update_per_expert_and_whole():
    up = _update("a", {K1: torch.tensor([3.0, 4.0]), K2: torch.tensor([0.0, 12.0]),
                       G: torch.tensor([0.0, 0.0])})
    assert expert_norms(up) == {E1: 5.0, E2: 12.0}
    assert update_norm(up) == 13.0
    assert norm_violations(up, 0.0, 0.0) == []  # both bounds off
    assert norm_violations(up, 13.0, 12.0) == []  # at the bounds is within
    assert norm_violations(up, 10.0, 6.0) == ["expert 0:2 norm 12 > 6", "update norm 13 > 10"]


def test_clip_scales_each_expert_then_the_whole_update():
    up = _update("a", {K1: torch.tensor([3.0, 4.0]), K2: torch.tensor([0.0, 12.0]),
                       G: torch.tensor([0.0, 0.0])})
    clipped = clip_update(up, 0.0, 6.0)
    assert clipped.deltas[K1] is up.deltas[K1]  # within: the same tensor
    torch.testing.assert_close(clipped.deltas[K2], torch.tensor([0.0, 6.0]))
    # then the whole: sqrt(5^2 + 6^2) = 7.81 scaled to 3.905
    both = clip_update(up, 7.81 / 2, 6.0)
    assert update_norm(both) == pytest.approx(7.81 / 2, rel=1e-6)
    torch.testing.assert_close(both.deltas[K1], torch.tensor([1.5, 2.0]), rtol=1e-3, atol=1e-3)
    assert (both.num_examples, both.updated, both.usage) == (up.num_examples, up.updated,
                                                             up.usage)


# --- the robust means --------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "fraction", "trim"), [
    (1, 0.1, 0), (2, 0.1, 0), (3, 0.1, 1), (10, 0.1, 1), (11, 0.1, 2), (10, 0.2, 2),
    (10, 0.0, 0), (4, 0.49, 1),
])
def test_trim_count_keeps_at_least_one_value(n, fraction, trim):
    assert trim_count(n, fraction) == trim


def test_trimmed_mean_equals_the_hand_computed_values():
    deltas = [torch.tensor([1.0, 10.0, -3.0]), torch.tensor([2.0, -5.0, 0.0]),
              torch.tensor([100.0, 0.0, 4.0]), torch.tensor([3.0, 1.0, 1.0])]
    # per element, drop the largest and the smallest, average the middle two
    torch.testing.assert_close(trimmed_mean(deltas, 1), torch.tensor([2.5, 0.5, 0.5]))
    torch.testing.assert_close(trimmed_mean(deltas, 0), torch.tensor([26.5, 1.5, 0.5]))
    with pytest.raises(AlgorithmError):
        trimmed_mean(deltas, 2)


def test_norm_bounded_mean_clips_to_the_median_norm():
    deltas = [torch.tensor([3.0, 4.0]), torch.tensor([0.0, 1.0]), torch.tensor([0.0, 50.0])]
    # norms 5, 1, 50: median 5; the third is scaled to [0, 5]
    out = norm_bounded_mean(deltas, [0.5, 0.25, 0.25])
    torch.testing.assert_close(out, torch.tensor([1.5, 2.0 + 0.25 + 1.25]))


# --- per key in aggregation ------------------------------------------------------------------
def _round() -> tuple[dict, list[SparseUpdate]]:
    glob = {K1: torch.zeros(2), K2: torch.ones(2), G: torch.zeros(2)}
    ups = [_update("a", {K1: torch.tensor([1.0, 10.0])}),
           _update("b", {K1: torch.tensor([2.0, -5.0])}),
           _update("c", {K1: torch.tensor([100.0, 0.0]), K2: torch.tensor([4.0, 4.0])})]
    return glob, ups


def test_trimmed_mean_per_key_over_its_senders_only():
    glob, ups = _round()
    out = aggregate(glob, ups, AggregationRule(robust="trimmed-mean"))
    # K1 from a, b, c: the middle value per element; K2 from c alone: nothing trimmed (1 + 4);
    # the gate nobody sent keeps its very tensor
    torch.testing.assert_close(out[K1], torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(out[K2], torch.tensor([5.0, 5.0]))
    assert out[G] is glob[G]


def test_robust_kinds_leave_the_other_kinds_to_the_weighted_mean():
    glob, ups = _round()
    out = aggregate(glob, ups, AggregationRule(robust="trimmed-mean", robust_kinds=("gate",)))
    torch.testing.assert_close(out[K1], torch.tensor([103.0 / 3, 5.0 / 3]))


def test_the_buffered_streaming_aggregator_equals_the_batch_function():
    glob, ups = _round()
    for robust in ("trimmed-mean", "norm-bounded"):
        rule = AggregationRule(robust=robust)
        agg = Aggregator(rule)
        for u in ups:
            agg.add(u)
        assert agg.buffered and agg.num_clients == 3
        want = aggregate(glob, ups, rule)
        got = agg.finalize(glob)
        for k in glob:
            torch.testing.assert_close(got[k], want[k])
        with pytest.raises(AlgorithmError, match="robust"):
            agg.to_bytes()  # a buffer does not travel as a partial aggregate


def test_merging_buffered_aggregators_equals_one():
    glob, ups = _round()
    rule = AggregationRule(robust="trimmed-mean")
    first, second = Aggregator(rule), Aggregator(rule)
    first.add(ups[0])
    for u in ups[1:]:
        second.add(u)
    first.merge(second)
    torch.testing.assert_close(first.finalize(glob)[K1], torch.tensor([2.0, 0.0]))
    with pytest.raises(AlgorithmError, match="buffered"):
        first.merge(Aggregator(AggregationRule()))


@pytest.mark.parametrize("kwargs", [{"robust": "median"}, {"trim_fraction": 0.5},
                                    {"robust_kinds": ("router",)}])
def test_a_bad_robust_rule_is_refused(kwargs):
    with pytest.raises(AlgorithmError):
        AggregationRule(**kwargs)
