"""Expert (Eq. 17) and gate (Eq. 18-21) aggregation, batch and streaming, on hand-made values.

Worked round (tau = 0.01). Global state:
    e00 = layers.0.experts.0.w = [1, 2]     e01 = [0, 0]     e02 = [5, 5]
    gate = layers.0.gate.weight = [1, 1]    head.w = [0]     head.b = [10] (nobody sends it)

Client A, |D| = 1: usage {e00: .5, e01: .5, e02: 0}, s^c {e00: .3, e01: .2, e02: .1},
    updated {e00, e02}, sends e00 [1, 1], e02 [100, 100], gate [4, 0], head.w [1].
    aggregated = {e00} (e02: 0 < tau).  S_A = {e00, e01}.  P_A = .5*.3 + .5*.2 = 0.25
Client B, |D| = 3: usage {e00: .2, e01: .8, e02: .005}, s^c {e00: 0, e01: .6875, e02: .5},
    updated {e00, e01, e02}, sends e00 [2, 0], e01 [4, 8], e02 [-7, -7], gate [0, 4], head.w [5].
    aggregated = {e00, e01} (e02: .005 < tau).  S_B = {e00, e01}.  P_B = .8 * .6875 = 0.55

HFedMoE:
    e00: w = (1/4, 3/4) -> [1 + 1/4 + 6/4, 2 + 1/4 + 0] = [2.75, 2.25]
    e01: only B -> [4, 8]                       (one client sends an expert nobody else sends)
    e02: nobody above tau -> [5, 5], the same tensor
    gate: alpha = (.25, .55) / .8 = (0.3125, 0.6875) -> [1 + 1.25, 1 + 2.75] = [2.25, 3.75]
    head.w: (1/4, 3/4) -> 0 + 0.25 + 3.75 = [4]
    r(A) = r(B) = |{e00, e01}| / 2 = 1
Plain data-size rule (baselines): e02 -> 5 + (100 - 21) / 4 = [24.75, 24.75];
    gate -> [1 + 1, 1 + 3] = [2, 4]; e00, e01, head.w as above.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hfedmoe.aggregation import (
    PLAIN_RULE,
    AggregationRule,
    aggregate,
    aggregate_experts,
    aggregate_gates,
    aggregate_shared,
    expert_weights,
    gate_alphas,
    key_weights,
    round_report,
    summarize,
)
from hfedmoe.aggregator import Aggregator
from hfedmoe.errors import AlgorithmError
from hfedmoe.names import ExpertId
from hfedmoe.update import SparseUpdate

E00, E01, E02 = ExpertId(0, 0), ExpertId(0, 1), ExpertId(0, 2)
K00, K01, K02 = "layers.0.experts.0.w", "layers.0.experts.1.w", "layers.0.experts.2.w"
GATE, HEAD_W, HEAD_B = "layers.0.gate.weight", "shared.head.w", "shared.head.b"
RULE = AggregationRule(tau=0.01)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _global() -> dict[str, torch.Tensor]:
    return {K00: t(1, 2), K01: t(0, 0), K02: t(5, 5), GATE: t(1, 1), HEAD_W: t(0), HEAD_B: t(10)}


def _update(client_id: str, n: int, deltas: dict, usage: dict, importance: dict,
            updated: set) -> SparseUpdate:
    return SparseUpdate(run_id="r", round_idx=0, client_id=client_id, num_examples=n,
                        deltas=deltas, usage=usage, importance=importance,
                        routed=frozenset(usage), updated=frozenset(updated))


def _clients() -> list[SparseUpdate]:
    a = _update("A", 1, {K00: t(1, 1), K02: t(100, 100), GATE: t(4, 0), HEAD_W: t(1)},
                {E00: .5, E01: .5, E02: 0.0}, {E00: .3, E01: .2, E02: .1}, {E00, E02})
    b = _update("B", 3, {K00: t(2, 0), K01: t(4, 8), K02: t(-7, -7), GATE: t(0, 4), HEAD_W: t(5)},
                {E00: .2, E01: .8, E02: .005}, {E00: 0.0, E01: .6875, E02: .5}, {E00, E01, E02})
    return [a, b]


def _assert_values(state: dict, expected: dict) -> None:
    assert state.keys() == expected.keys()
    for key, values in expected.items():
        assert state[key].tolist() == pytest.approx(values), key


def test_hfedmoe_round_by_hand():
    glob = _global()
    new = aggregate(glob, _clients(), RULE)
    _assert_values(new, {K00: [2.75, 2.25], K01: [4.0, 8.0], K02: [5.0, 5.0],
                                          GATE: [2.25, 3.75], HEAD_W: [4.0], HEAD_B: [10.0]})
    assert new[K02] is glob[K02] and new[HEAD_B] is glob[HEAD_B]  # untouched: bit-identical


def test_streaming_matches_hand_values_in_any_order():
    for order in (_clients(), list(reversed(_clients()))):
        agg = Aggregator(RULE)
        for update in order:
            agg.add(update)
        new = agg.finalize(_global())
        _assert_values(new, {K00: [2.75, 2.25], K01: [4.0, 8.0], K02: [5.0, 5.0],
                             GATE: [2.25, 3.75], HEAD_W: [4.0], HEAD_B: [10.0]})
        assert agg.num_clients == 2


def test_plain_rule_averages_what_was_sent():
    new = aggregate(_global(), _clients(), PLAIN_RULE)
    _assert_values(new, {K00: [2.75, 2.25], K01: [4.0, 8.0],
                                          K02: [24.75, 24.75], GATE: [2.0, 4.0], HEAD_W: [4.0],
                                          HEAD_B: [10.0]})


def test_weights_alpha_and_report():
    assert expert_weights(_clients(), 0.01) == {E00: {"A": .25, "B": .75}, E01: {"B": 1.0}}
    w = key_weights(_clients(), RULE)
    assert w[GATE] == pytest.approx({"A": 0.3125, "B": 0.6875})
    assert K02 not in w  # nobody qualifies
    summaries = [summarize(u, 0.01) for u in _clients()]
    assert [s.gate_mass for s in summaries] == pytest.approx([0.25, 0.55])
    assert gate_alphas(summaries) == pytest.approx({"A": 0.3125, "B": 0.6875})
    report = round_report(_clients(), 0.01)
    assert report["A"].aggregated == {E00} and report["A"].updated == {E00, E02}
    assert report["B"].aggregated == {E00, E01}
    assert report["A"].overlap_ratio == report["B"].overlap_ratio == 1.0
    assert report["B"].alpha == pytest.approx(0.6875)


def test_overlap_ratio_eq18():
    # S_A = {e00, e01}, S_B = {e01}: S_global = {e00, e01}; r(A) = 2/2 = 1, r(B) = 1/2.
    a = _update("A", 1, {}, {E00: .5, E01: .5}, {}, set())
    b = _update("B", 1, {}, {E00: .001, E01: .999}, {}, set())
    report = round_report([a, b], 0.01)
    assert report["A"].overlap_ratio == 1.0 and report["B"].overlap_ratio == 0.5


def test_alpha_falls_back_to_data_size_when_all_zero():
    # tau = 0.9: no usage reaches it, S_c is empty, every P(c) = 0 -> weights |D_c| = (1/4, 3/4),
    # gate -> [1 + 1, 1 + 3]; no expert qualifies either, so every expert keeps its tensor.
    glob = _global()
    summaries = [summarize(u, 0.9) for u in _clients()]
    assert gate_alphas(summaries) == pytest.approx({"A": 0.25, "B": 0.75})
    new = aggregate(glob, _clients(), AggregationRule(tau=0.9))
    assert new[GATE].tolist() == pytest.approx([2.0, 4.0])
    assert all(new[k] is glob[k] for k in (K00, K01, K02))
    assert round_report(_clients(), 0.9)["A"].overlap_ratio == 0.0


def test_gate_alpha_renormalised_over_senders():
    # Only A sends the gate (P_A = .25): weight 1 -> [1 + 4, 1 + 0]. A lone sender with P = 0
    # falls back to its data size, also weight 1.
    a, b = _clients()
    b = _update("B", 3, {}, b.usage, b.importance, set())
    assert aggregate(_global(), [a, b], RULE)[GATE].tolist() == [5.0, 1.0]
    zero = _update("Z", 2, {GATE: t(2, 2)}, {E00: 0.0}, {}, set())
    assert aggregate(_global(), [zero, b], RULE)[GATE].tolist() == [3.0, 3.0]


def test_kind_restricted_helpers():
    glob = _global()
    experts_only = aggregate_experts(glob, _clients(), 0.01)
    assert experts_only[K00].tolist() == [2.75, 2.25] and experts_only[GATE] is glob[GATE]
    gates_only = aggregate_gates(glob, _clients(), 0.01)
    assert gates_only[GATE].tolist() == pytest.approx([2.25, 3.75]) and gates_only[K00] is glob[K00]
    shared_only = aggregate_shared(glob, _clients())
    assert shared_only[HEAD_W].tolist() == [4.0] and shared_only[K01] is glob[K01]


def test_float32_global_keeps_its_dtype():
    glob = {k: v.float() for k, v in _global().items()}
    new = aggregate(glob, _clients(), RULE)
    assert new[K00].dtype == torch.float32 and new[K00].tolist() == [2.75, 2.25]


@pytest.mark.parametrize("mutate", ["shape", "unknown", "not-updated", "examples", "int"])
def test_inconsistent_updates_raise(mutate):
    a, b = _clients()
    deltas = dict(a.deltas)
    n, updated = a.num_examples, set(a.updated)
    if mutate == "shape":
        deltas[K00] = t(1, 1, 1)
    elif mutate == "unknown":
        deltas["layers.0.experts.9.w"] = t(1, 1)
        updated.add(ExpertId(0, 9))
    elif mutate == "not-updated":
        deltas[K01] = t(1, 1)  # A did not update e01
    elif mutate == "examples":
        n = 0
    else:
        deltas[K00] = torch.tensor([1, 1])
    bad = _update("A", n, deltas, a.usage, a.importance, updated)
    with pytest.raises(AlgorithmError):
        aggregate(_global(), [bad, b], RULE)
    with pytest.raises(AlgorithmError):
        agg = Aggregator(RULE)
        agg.add(bad)
        agg.add(b)
        agg.finalize(_global())


def test_duplicate_client_and_cross_client_shape_mismatch_raise():
    a, b = _clients()
    with pytest.raises(AlgorithmError):
        aggregate(_global(), [a, a], RULE)
    agg = Aggregator(RULE)
    agg.add(a)
    with pytest.raises(AlgorithmError):
        agg.add(a)
    odd = _update("C", 1, {K00: t(1, 1, 1)}, {E00: .5}, {}, {E00})
    with pytest.raises(AlgorithmError):
        agg.add(odd)


# ---------------------------------------------------------------------------------------------
# Properties: random rounds over 2 layers x 3 experts


KEYS_PER_EXPERT = ("w1", "w2")


@st.composite
def rounds(draw):
    num_clients = draw(st.integers(1, 5))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    experts = [ExpertId(layer, e) for layer in range(2) for e in range(3)]
    updates = []
    for c in range(num_clients):
        usage = {e: draw(st.sampled_from([0.0, 0.005, 0.02, 0.3, 0.9])) for e in experts}
        importance = {e: draw(st.sampled_from([0.0, 0.1, 0.5])) for e in experts}
        updated = {e for e in experts if draw(st.booleans())}
        deltas = {}
        for e in sorted(updated):
            for p in KEYS_PER_EXPERT:
                if draw(st.booleans()):
                    deltas[f"layers.{e.layer_idx}.experts.{e.expert_idx}.{p}"] = torch.randn(
                        2, 3, generator=gen, dtype=torch.float64)
        for layer in range(2):
            if draw(st.booleans()):
                deltas[f"layers.{layer}.gate.weight"] = torch.randn(3, 4, generator=gen,
                                                                    dtype=torch.float64)
        if draw(st.booleans()):
            deltas["shared.head.weight"] = torch.randn(5, generator=gen, dtype=torch.float64)
        updates.append(_update(f"c{c}", draw(st.integers(1, 50)), deltas, usage, importance,
                               updated))
    return updates


def _random_global(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {f"layers.{layer}.experts.{e}.{p}": torch.randn(2, 3, generator=gen,
                                                            dtype=torch.float64)
             for layer in range(2) for e in range(3) for p in KEYS_PER_EXPERT}
    state |= {f"layers.{layer}.gate.weight": torch.randn(3, 4, generator=gen, dtype=torch.float64)
              for layer in range(2)}
    state["shared.head.weight"] = torch.randn(5, generator=gen, dtype=torch.float64)
    return state


@settings(max_examples=50, deadline=None)
@given(updates=rounds(), plain=st.booleans(), tau=st.sampled_from([0.0, 0.01, 0.5]))
def test_weights_sum_to_one_and_only_qualified_senders(updates, plain, tau):
    rule = PLAIN_RULE if plain else AggregationRule(tau=tau)
    by_client = {u.client_id: u for u in updates}
    for key, weights in key_weights(updates, rule).items():
        assert sum(weights.values()) == pytest.approx(1.0)
        assert all(w > 0 and key in by_client[c].deltas for c, w in weights.items())
        if not plain and key.startswith("layers.") and ".experts." in key:
            _, layer, _, expert, _ = key.split(".")
            e = ExpertId(int(layer), int(expert))
            assert all(by_client[c].usage[e] >= tau for c in weights)


@settings(max_examples=50, deadline=None)
@given(updates=rounds(), plain=st.booleans(), tau=st.sampled_from([0.0, 0.01, 0.5]),
       shuffle_seed=st.integers(0, 1000))
def test_streaming_equals_batch_and_untouched_keys_are_identical(updates, plain, tau,
                                                                 shuffle_seed):
    rule = PLAIN_RULE if plain else AggregationRule(tau=tau)
    glob = _random_global()
    batch = aggregate(glob, updates, rule)
    shuffled = list(updates)
    random.Random(shuffle_seed).shuffle(shuffled)
    agg = Aggregator(rule)
    for update in shuffled:
        agg.add(update)
    stream = agg.finalize(glob)
    assert batch.keys() == stream.keys() == glob.keys()
    weighted = key_weights(updates, rule)
    for key in glob:
        torch.testing.assert_close(stream[key], batch[key], rtol=1e-12, atol=1e-12)
        if key not in weighted:  # nobody qualified: the old tensor, bit for bit
            assert batch[key] is glob[key] and stream[key] is glob[key]
    streamed, batched = agg.report(), round_report(updates, rule.tau)
    assert streamed.keys() == batched.keys()
    for c, rep in batched.items():
        assert (streamed[c].aggregated, streamed[c].updated) == (rep.aggregated, rep.updated)
        assert streamed[c].alpha == pytest.approx(rep.alpha)
        assert streamed[c].overlap_ratio == rep.overlap_ratio


def _more_clients() -> list[SparseUpdate]:
    c = _update("C", 2, {K00: t(-1, 3), GATE: t(2, 2), HEAD_W: t(2)},
                {E00: .9, E01: .1, E02: 0.0}, {E00: .4, E01: 0.0, E02: 0.0}, {E00})
    d = _update("D", 5, {K01: t(1, 1), GATE: t(0, 1), HEAD_W: t(-3)},  # P(D) = 0: fallback only
                {E00: 0.0, E01: 1.0, E02: 0.0}, {E00: 0.0, E01: 0.0, E02: 0.0}, {E01})
    return [*_clients(), c, d]


@pytest.mark.parametrize("split", [[0, 1, 2, 3], [0, 2, 1, 3], [3, 0, 1, 2]])
def test_partial_aggregates_merged_equal_one_aggregator(split):
    """Shards aggregated apart, serialized (as ingest workers write them), read back and merged
    give the state and report of one aggregator over every update."""
    updates = _more_clients()
    whole = Aggregator(RULE)
    for u in updates:
        whole.add(u)
    shards = [Aggregator(RULE), Aggregator(RULE)]
    for i, u in zip(split, updates, strict=True):
        shards[i % 2].add(u)
    merged = Aggregator(RULE)
    for shard in shards:
        merged.merge(Aggregator.from_bytes(shard.to_bytes(), RULE))
    glob = _global()
    want, got = whole.finalize(glob), merged.finalize(glob)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.allclose(want[key], got[key], atol=1e-6), key
    assert merged.report() == whole.report()
    with pytest.raises(AlgorithmError, match="two partial"):
        merged.merge(Aggregator.from_bytes(shards[0].to_bytes(), RULE))
    with pytest.raises(AlgorithmError, match="not a partial"):
        Aggregator.from_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}" + b"x" * 8, RULE)


def test_importance_size_gate_weights_are_alpha_times_data_size():
    # gate masses P = (0.25, 0.55) and |D_c| = (1, 3): weights 0.25 and 1.65 of 1.9
    rule = AggregationRule("usage-threshold", "importance-size", 0.01)
    w = key_weights(_clients(), rule)
    assert w[GATE] == pytest.approx({"A": 0.25 / 1.9, "B": 1.65 / 1.9})
    assert w[K00] == key_weights(_clients(), RULE)[K00]  # experts: Eq. 17 either way


def _withholding(update: SparseUpdate, *names: str) -> SparseUpdate:
    """``update`` as a device that withheld ``names`` sends it (absent, marked in meta)."""
    import dataclasses

    cut = {"usage": {}, "importance": {}}
    fields = {n: cut[n] for n in names if n in cut}
    return dataclasses.replace(update, **fields,
                               meta=update.meta.replace(withheld=sorted(names)))


def test_withheld_usage_and_importance_aggregate_by_data_size_without_gate_mass():
    # B withholds both: every expert it updated counts (e02 too: 5 - 7 = -2), with |D| weights;
    # it has no gate mass, so the gate takes A's delta alone: [1 + 4, 1 + 0].
    a, b = _clients()
    clients = [a, _withholding(b, "usage", "importance")]
    expected = {K00: [2.75, 2.25], K01: [4.0, 8.0], K02: [-2.0, -2.0], GATE: [5.0, 1.0],
                HEAD_W: [4.0], HEAD_B: [10.0]}
    _assert_values(aggregate(_global(), clients, RULE), expected)
    agg = Aggregator(RULE)
    for update in reversed(clients):
        agg.add(update)
    _assert_values(agg.finalize(_global()), expected)


def test_withheld_importance_alone_leaves_experts_to_usage():
    a, b = _clients()
    new = aggregate(_global(), [_withholding(a, "importance"), b], RULE)
    # experts as in the worked round (usage still says e02 is under tau); gate: B's alone
    _assert_values(new, {K00: [2.75, 2.25], K01: [4.0, 8.0], K02: [5.0, 5.0],
                         GATE: [1.0, 5.0], HEAD_W: [4.0], HEAD_B: [10.0]})
    both = aggregate(_global(), [_withholding(a, "importance"), _withholding(b, "importance")],
                     RULE)
    assert both[GATE].tolist() == pytest.approx([2.0, 4.0])  # nobody has mass: data size
