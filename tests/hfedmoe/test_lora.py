"""LoRA factors on the wire and their exact aggregation (hfedmoe.lora), on hand-made values.

Worked round, rank 1, alpha 2 (scale 2), tau = 0.01. One expert weight W = layers.0.experts.0.w_in,
shape (2, 3), global value 0. Usage of expert 0:0 is 0.5 for both clients, so both aggregate it
with data-size weights |D_A| = 1, |D_B| = 3:

    A_A = [[1, 0, 0]], B_A = [[1], [0]]  ->  dW_A = 2 * B_A A_A = [[2, 0, 0], [0, 0, 0]]
    A_B = [[0, 1, 0]], B_B = [[0], [1]]  ->  dW_B = [[0, 0, 0], [0, 2, 0]]
    exact:  W = (1 * dW_A + 3 * dW_B) / 4 = [[0.5, 0, 0], [0, 1.5, 0]]
    factor averaging: mean B = [[1/4], [3/4]], mean A = [[1/4, 3/4, 0]]
        -> 2 * mean B @ mean A = [[1/8, 3/8, 0], [3/8, 9/8, 0]]: not the average of the updates.
"""

from __future__ import annotations

import pytest
import torch

from hfedmoe.aggregation import AggregationRule
from hfedmoe.aggregator import Aggregator
from hfedmoe.errors import ConfigError, NonFiniteError, SchemaError, ShapeError, UnknownKeyError
from hfedmoe.lora import LoRASpec, expand, factor_keys, split_factor_key, with_factors
from hfedmoe.names import ExpertId
from hfedmoe.update import SparseUpdate
from hfedmoe.wire import decode, encode, spec_from_state

E = ExpertId(0, 0)
W = "layers.0.experts.0.w_in"
A_KEY, B_KEY = factor_keys(W)
LORA = LoRASpec(rank=1, alpha=2.0)
GLOBAL = {W: torch.zeros(2, 3), "layers.0.experts.0.w_out": torch.zeros(3, 1),
          "layers.0.experts.0.b_in": torch.zeros(2), "layers.0.gate.weight": torch.zeros(1, 3),
          "shared.head.w": torch.zeros(1)}


def client(cid: str, n: int, a: list[list[float]], b: list[list[float]],
           extra: dict | None = None) -> SparseUpdate:
    return SparseUpdate(run_id="r", round_idx=0, client_id=cid, num_examples=n,
                        deltas={A_KEY: torch.tensor(a), B_KEY: torch.tensor(b), **(extra or {})},
                        usage={E: 0.5}, importance={E: 0.5}, routed=frozenset({E}),
                        updated=frozenset({E}))


A_CLIENT = client("A", 1, [[1, 0, 0]], [[1], [0]])
B_CLIENT = client("B", 3, [[0, 1, 0]], [[0], [1]])


def test_aggregation_averages_the_products_not_the_factors():
    agg = Aggregator(AggregationRule(tau=0.01))
    for u in (A_CLIENT, B_CLIENT):
        agg.add(expand(u, LORA))
    new = agg.finalize(GLOBAL)
    torch.testing.assert_close(new[W], torch.tensor([[0.5, 0, 0], [0, 1.5, 0]]))
    factor_avg = 2 * torch.tensor([[0.25], [0.75]]) @ torch.tensor([[0.25, 0.75, 0.0]])
    assert (new[W] - factor_avg).abs().max() > 0.3  # the naive scheme is measurably wrong
    assert new["shared.head.w"] is GLOBAL["shared.head.w"]  # nobody sent it: same tensor


def test_expand_keeps_dense_deltas_and_uses_the_scale():
    bias = torch.tensor([1.0, -1.0])
    out = expand(client("A", 1, [[1, 2, 3]], [[1], [1]], {"layers.0.experts.0.b_in": bias}),
                 LoRASpec(rank=1, alpha=0.5))
    assert set(out.deltas) == {W, "layers.0.experts.0.b_in"}
    torch.testing.assert_close(out.deltas[W], 0.5 * torch.tensor([[1.0, 2, 3], [1, 2, 3]]))
    assert out.deltas["layers.0.experts.0.b_in"] is bias


def test_factor_keys_are_only_those_of_expert_weights():
    assert split_factor_key(A_KEY) == (W, "lora_A")
    assert split_factor_key("layers.0.experts.0.b_in.lora_A") is None  # biases carry no factors
    assert split_factor_key("layers.0.gate.weight.lora_A") is None
    assert split_factor_key("shared.head.w") is None


def test_the_spec_fixes_the_rank_and_shapes():
    spec = with_factors(spec_from_state(GLOBAL), LoRASpec(rank=4))
    assert spec.params[A_KEY].shape == (4, 3) and spec.params[B_KEY].shape == (2, 4)
    a, b = factor_keys("layers.0.experts.0.w_out")
    assert spec.params[a].shape == (4, 1) and spec.params[b].shape == (3, 4)
    assert not any(k.startswith("layers.0.experts.0.b_in.") for k in spec.params)
    with pytest.raises(ConfigError):
        LoRASpec(rank=0)


def test_factors_round_trip_the_wire_and_bad_ones_are_rejected_with_typed_errors():
    spec = with_factors(spec_from_state(GLOBAL), LORA)
    got = expand(decode(encode(A_CLIENT, 0.01), spec), LORA)
    torch.testing.assert_close(got.deltas[W], torch.tensor([[2.0, 0, 0], [0, 0, 0]]))
    # factors of another rank: the spec's shape check
    with pytest.raises(ShapeError):
        decode(encode(client("A", 1, [[1, 0, 0], [0, 1, 0]], [[1, 0], [0, 1]]), 0.01), spec)
    # a model without LoRA does not know the keys
    with pytest.raises(UnknownKeyError):
        decode(encode(A_CLIENT, 0.01), spec_from_state(GLOBAL))
    # NaN in a factor
    with pytest.raises(NonFiniteError):
        decode(encode(client("A", 1, [[float("nan"), 0, 0]], [[1], [0]]), 0.01), spec)
    # a factor without its partner
    lonely = SparseUpdate(run_id="r", round_idx=0, client_id="A", num_examples=1,
                          deltas={A_KEY: torch.ones(1, 3)}, usage={E: 0.5},
                          updated=frozenset({E}))
    with pytest.raises(SchemaError, match="pairs"):
        expand(decode(encode(lonely, 0.01), spec), LORA)
    # factors and a dense delta for the same weight
    both = client("A", 1, [[1, 0, 0]], [[1], [0]], {W: torch.ones(2, 3)})
    with pytest.raises(SchemaError, match="both"):
        expand(both, LORA)
    # rank that does not match the run's, when the spec is not the guard
    with pytest.raises(ShapeError):
        expand(A_CLIENT, LoRASpec(rank=2))
