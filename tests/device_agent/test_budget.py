"""C_budget from the cost model, and the re-measure monitor, on hand-computed cases.

The reference case: 8 experts; base memory = 1000 (non-expert weights) + 8 x 100 (expert
weights) + 200 (non-expert activations) = 2000 B; each trained expert adds 300 + 200 = 500 B.
Step time with c trained = 0.5 + (8 - c) x 0.25 + c x 1.0 = 2.5 + 0.75 c seconds.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_agent.budget import (
    DEFAULT_MEMORY_MARGIN,
    Budget,
    CostModel,
    Limits,
    budget_from_report,
    compute_budget,
    expert_activation_bytes,
    expert_state_bytes,
    layer_input_bytes,
    layers_of,
    memory_max_experts,
    tokens_per_expert,
)
from device_agent.monitor import BudgetMonitor, MonitorConfig, Observation
from device_agent.profiles import load_profile
from hfedmoe.errors import DeviceError

COST = CostModel(num_experts=8, non_expert_weight_bytes=1000, expert_weight_bytes=100,
                 expert_state_bytes=300, expert_activation_bytes=200,
                 non_expert_activation_bytes=200, rest_step_seconds=0.5,
                 expert_frozen_seconds=0.25, expert_trained_seconds=1.0)


def limits(**kw: object) -> Limits:
    base = {"available_bytes": 5000, "deadline_seconds": 60.0, "steps_per_round": 10,
            "margin_fraction": 0.1}
    return Limits(**{**base, **kw})  # type: ignore[arg-type]


def test_time_bound() -> None:
    # usable 4500 -> (4500 - 2000) // 500 = 5 by memory; 6 s per step -> (6 - 2.5) / 0.75 = 4.67
    budget = compute_budget(COST, limits())

    assert (budget.c_budget, budget.limit) == (4, "time")
    assert (budget.memory_max, budget.time_max) == (5, 4)
    assert budget.step_seconds == pytest.approx(5.5)
    assert budget.round_seconds == pytest.approx(55.0)
    assert budget.peak_bytes == 4000


def test_memory_bound_inclusive_at_the_limit() -> None:
    # 10 s per step -> time allows all 8; memory 5 exactly fills the 4500 usable bytes.
    budget = compute_budget(COST, limits(deadline_seconds=100.0))

    assert (budget.c_budget, budget.limit) == (5, "memory")
    assert budget.peak_bytes == 4500


def test_deadline_boundary() -> None:
    assert compute_budget(COST, limits(deadline_seconds=55.0)).c_budget == 4
    assert compute_budget(COST, limits(deadline_seconds=54.99)).c_budget == 3


def test_everything_fits() -> None:
    budget = compute_budget(COST, limits(available_bytes=100_000, deadline_seconds=1000.0))

    assert (budget.c_budget, budget.limit) == (8, "all-experts")
    assert budget.peak_bytes == 6000


def test_nothing_fits_memory() -> None:
    budget = compute_budget(COST, limits(available_bytes=2000))  # usable 1800 < 2000

    assert (budget.c_budget, budget.limit, budget.memory_max) == (0, "memory", -1)
    assert "nothing fits" in budget.reason and "memory" in budget.reason


def test_window_too_short_trains_fewer_steps_not_zero_experts() -> None:
    budget = compute_budget(COST, limits(deadline_seconds=20.0))  # 10 x 2.5 s = 25 s

    # one expert (min_experts) at 3.25 s per step: 6 of the 10 steps fit in 20 s
    assert (budget.c_budget, budget.limit, budget.time_max) == (1, "time", -1)
    assert budget.steps == 6 and "fewer steps" in budget.reason
    assert budget.round_seconds == pytest.approx(19.5)

    gates_only = compute_budget(COST, limits(deadline_seconds=20.0, min_experts=0))
    assert (gates_only.c_budget, gates_only.steps) == (0, 8)  # 8 x 2.5 s


def test_cap_lowers_never_raises() -> None:
    lower = compute_budget(COST, limits(cap=2))
    assert (lower.c_budget, lower.limit) == (2, "cap")
    assert lower.step_seconds == pytest.approx(4.0)

    higher = compute_budget(COST, limits(cap=7))
    assert (higher.c_budget, higher.limit) == (4, "time")
    assert "ignored" in higher.reason

    assert compute_budget(COST, limits(cap=0)).c_budget == 0


def test_margin_bytes_add_to_the_fraction() -> None:
    budget = compute_budget(COST, limits(margin_fraction=0.0, margin_bytes=1000,
                                         deadline_seconds=100.0))
    assert (budget.c_budget, budget.limit) == (4, "memory")  # (4000 - 2000) // 500


def test_state_and_activation_estimates() -> None:
    assert expert_state_bytes(1000, "adamw") == 4000 + 8000
    assert expert_state_bytes(1000, "sgd") == 4000
    assert expert_state_bytes(1000, "sgd", momentum=True) == 8000
    assert expert_state_bytes(1000, "adamw", param_dtype_bytes=2) == 2000 + 8000
    assert tokens_per_expert(8, 128, 2, 8) == 256
    assert tokens_per_expert(3, 5, 1, 4) == 4
    assert expert_activation_bytes(256, 32, 64) == 256 * (32 + 3 * 64) * 4
    assert expert_activation_bytes(10, 32, 64, dtype_bytes=2, gated=False) == 10 * 160 * 2
    with pytest.raises(DeviceError):
        expert_state_bytes(10, "lion")


def test_invalid_inputs_raise() -> None:
    with pytest.raises(DeviceError):
        dataclasses.replace(COST, expert_trained_seconds=0.1)
    with pytest.raises(DeviceError):
        dataclasses.replace(COST, expert_weight_bytes=-1)
    with pytest.raises(DeviceError):
        limits(steps_per_round=0)
    with pytest.raises(DeviceError):
        limits(cap=-1)


def test_budget_json_round_trip() -> None:
    budget = compute_budget(COST, limits(cap=3))
    assert Budget.from_dict(json.loads(json.dumps(budget.to_dict()))) == budget


def test_budget_from_emulated_report() -> None:
    phone = load_profile("phone-midrange-6gb")
    gib = 1024**3
    cost = dataclasses.replace(COST, non_expert_weight_bytes=gib // 2, expert_weight_bytes=gib // 32,
                               expert_state_bytes=gib // 16, expert_activation_bytes=gib // 16)
    budget = budget_from_report(phone, cost, deadline_seconds=1000.0, steps_per_round=10)

    # the default 15 % margin: usable 1.7 GiB; base 0.75 GiB + 200 B; each trained expert
    # 0.125 GiB -> 7 fit
    assert budget.limits.available_bytes == 2 * gib
    assert budget.limits.margin_fraction == DEFAULT_MEMORY_MARGIN == 0.15
    assert (budget.c_budget, budget.limit) == (7, "memory")
    loose = budget_from_report(phone, cost, 1000.0, 10, margin_fraction=0.1)
    assert (loose.c_budget, loose.limit) == (8, "all-experts")  # usable 1.8 GiB: all 8 fit
    tight = budget_from_report(phone, cost, 1000.0, 10, margin_fraction=0.5)
    # usable 1 GiB; free = 0.25 GiB - 200 B -> 1 trained expert of 0.125 GiB
    assert (tight.c_budget, tight.limit) == (1, "memory")


@given(
    n=st.integers(1, 64), base=st.integers(0, 10_000), per=st.integers(0, 1_000),
    avail=st.integers(0, 100_000), rest=st.floats(0, 5), frozen=st.floats(0, 1),
    extra=st.floats(0, 2), steps=st.integers(1, 50), deadline=st.floats(0.1, 2000),
)
def test_budget_is_the_largest_that_fits(n: int, base: int, per: int, avail: int, rest: float,
                                         frozen: float, extra: float, steps: int,
                                         deadline: float) -> None:
    cost = CostModel(num_experts=n, non_expert_weight_bytes=base, expert_weight_bytes=0,
                     expert_state_bytes=per, expert_activation_bytes=0,
                     rest_step_seconds=rest, expert_frozen_seconds=frozen,
                     expert_trained_seconds=frozen + extra)
    lim = Limits(available_bytes=avail, deadline_seconds=deadline, steps_per_round=steps)
    budget = compute_budget(cost, lim)

    def fits(c: int) -> bool:
        return (cost.peak_bytes(c) <= lim.usable_bytes
                and steps * cost.step_seconds(c) <= deadline * (1 + 1e-9))

    c = budget.c_budget
    assert 0 <= c <= n
    if budget.steps < steps:  # the window fits no step count with min_experts: fewer steps
        assert c == min(lim.min_experts, budget.memory_max) and not fits(c)
        assert budget.round_seconds <= deadline * (1 + 1e-9) or budget.steps == 0
        return
    if c > 0:
        assert fits(c)
    if c < n:
        assert not fits(c + 1)


# ---------------------------------------------------------------------------------------------
# Monitor


def monitor() -> BudgetMonitor:
    return BudgetMonitor(compute_budget(COST, limits()), MonitorConfig())


def test_no_change_no_remeasure() -> None:
    mon = monitor()
    decision = mon.observe(Observation(available_bytes=4600, cpufreq_ratio=0.95,
                                       temperature_c=60.0, step_seconds=6.0))
    assert not decision.remeasure and decision.budget.c_budget == 4


def test_memory_drop_triggers_and_lowers_budget() -> None:
    decision = monitor().observe(Observation(available_bytes=4000))

    assert decision.remeasure and decision.reasons[0].startswith("memory")
    # usable 3600 -> (3600 - 2000) // 500 = 3
    assert (decision.budget.c_budget, decision.budget.limit) == (3, "memory")


def test_throttling_triggers_once_and_recovers() -> None:
    mon = monitor()
    first = mon.observe(Observation(cpufreq_ratio=0.5))
    assert first.remeasure and "thermal" in first.reasons[0]
    # times doubled: 2 x (2.5 + 0.75 c) <= 6 has no c >= 1 -> one expert, fewer steps
    assert first.budget.c_budget == 1 and first.budget.step_seconds == pytest.approx(6.5)
    assert first.budget.steps == 9

    assert not mon.observe(Observation(cpufreq_ratio=0.5)).remeasure
    assert not mon.observe(Observation()).remeasure  # nothing thermal observed: no change

    ended = mon.observe(Observation(cpufreq_ratio=1.0, temperature_c=50.0))
    assert ended.remeasure and ended.reasons == ("thermal: throttling ended",)
    assert ended.budget.c_budget == 4


def test_temperature_and_capped_policy_trigger() -> None:
    assert monitor().check(Observation(temperature_c=85.0))[0].startswith("thermal")
    assert monitor().check(Observation(throttled=True))[0].startswith("thermal")


def test_step_time_drift_rescales_times() -> None:
    mon = monitor()
    assert mon.check(Observation(step_seconds=6.0)) == ()  # 9 % off the predicted 5.5 s

    decision = mon.observe(Observation(step_seconds=8.25))  # 1.5x the prediction
    # times x1.5: step(c) = 3.75 + 1.125 c; 10 steps <= 60 s -> c = 2
    assert decision.remeasure and decision.reasons[0].startswith("drift")
    assert decision.budget.c_budget == 2

    # the new prediction matches: no further trigger, and no compounding
    assert not mon.observe(Observation(step_seconds=decision.budget.step_seconds)).remeasure


def test_reset_after_remeasure() -> None:
    mon = monitor()
    mon.observe(Observation(available_bytes=4000))
    fresh = compute_budget(COST, limits(available_bytes=4000))
    mon.reset(fresh)
    assert mon.budget is fresh
    assert not mon.observe(Observation(available_bytes=4000)).remeasure


def test_routing_pass_is_counted_once_per_round() -> None:
    cost = dataclasses.replace(COST, routing_seconds=0.5)
    # no routing pass per step: 0.5 rest + (8 - 2) x 0.25 frozen + 2 x 1.0 trained = 4.0 s
    assert cost.step_seconds(2) == pytest.approx(4.0)
    assert cost.scaled_time(2.0).routing_seconds == pytest.approx(1.0)
    # 4 routing batches = 2 s per round; 10 steps in 58 s: 2.5 + 0.75 c <= 5.8 -> c = 4;
    # in 48 s: <= 4.8 -> c = 3
    budget = compute_budget(cost, limits(routing_batches=4))
    assert budget.c_budget == 4 and budget.round_seconds == pytest.approx(2.0 + 55.0)
    assert compute_budget(cost, limits(deadline_seconds=50.0, routing_batches=4)).c_budget == 3


def test_frozen_experts_saved_activations_count_against_memory() -> None:
    cost = dataclasses.replace(COST, expert_frozen_activation_bytes=50)
    # base = 2000 + 8 x 50 = 2400; one more trained expert adds 300 + 200 - 50 = 450 B
    assert (cost.base_bytes, cost.per_trained_expert_bytes) == (2400, 450)
    assert cost.peak_bytes(8) == COST.peak_bytes(8) == 6000  # all trained: the same total
    budget = compute_budget(cost, limits(deadline_seconds=100.0))
    assert (budget.c_budget, budget.limit) == (4, "memory")  # (4500 - 2400) // 450 = 4
    with pytest.raises(DeviceError, match="expert_frozen_activation_bytes"):
        dataclasses.replace(COST, expert_frozen_activation_bytes=201)


def test_gradients_and_activations_of_a_trained_expert_do_not_peak_together() -> None:
    # state 300 = 100 grad + 200 optimizer; activations 200: adds 200 + max(100, 200) = 400 B
    cost = dataclasses.replace(COST, expert_grad_bytes=100)
    assert cost.per_trained_expert_bytes == 400
    assert cost.peak_bytes(4) == 2000 + 4 * 400
    # grad 250 + optimizer 50: 50 + max(250, 200) = 300
    assert dataclasses.replace(COST, expert_grad_bytes=250).per_trained_expert_bytes == 300
    with pytest.raises(DeviceError, match="expert_grad_bytes"):
        dataclasses.replace(COST, expert_grad_bytes=301)


def test_trainer_fixed_part_counts_once_whatever_c() -> None:
    cost = dataclasses.replace(COST, trainer_fixed_bytes=250)
    # base = 2000 + 250; each trained expert still adds 500 B
    assert (cost.base_bytes, cost.per_trained_expert_bytes) == (2250, 500)
    assert [cost.peak_bytes(c) - COST.peak_bytes(c) for c in (0, 1, 4, 8)] == [250] * 4
    assert (cost.routed_peak_bytes([16.0], 128.0, 32.0)
            - COST.routed_peak_bytes([16.0], 128.0, 32.0)) == 250
    budget = compute_budget(cost, limits(deadline_seconds=100.0))
    assert (budget.c_budget, budget.limit) == (4, "memory")  # (4500 - 2250) // 500 = 4
    with pytest.raises(DeviceError, match="trainer_fixed_bytes"):
        dataclasses.replace(COST, trainer_fixed_bytes=-1)


def test_a_cost_model_serialized_before_the_trainer_fixed_part_still_loads() -> None:
    budget = compute_budget(dataclasses.replace(COST, trainer_fixed_bytes=250), limits())
    data = json.loads(json.dumps(budget.to_dict()))
    assert data["cost"]["trainer_fixed_bytes"] == 250
    assert Budget.from_dict(data) == budget

    del data["cost"]["trainer_fixed_bytes"]  # a budget stored by an older kit
    old = Budget.from_dict(data)
    assert old.cost.trainer_fixed_bytes == 0
    assert old.cost.peak_bytes(1) == COST.peak_bytes(1)


# The layered peak: 8 experts in 2 layers, 16 rows each (balanced); a trained expert keeps
# 200 (optimizer state) + 100 (starting values) = 300 B all round, writes 100 B of gradients
# and saves 150 B of activations beyond its frozen 50; a layer with a trained expert keeps its
# gathered input, 400 B.
LAYERED = dataclasses.replace(COST, expert_state_bytes=300, expert_grad_bytes=100,
                              expert_snapshot_bytes=100, expert_activation_bytes=200,
                              expert_frozen_activation_bytes=50, expert_rows=16,
                              batch_rows=64, num_layers=2, layer_input_bytes=400)


def test_a_layer_keeps_its_gathered_input_once_whatever_its_trained_experts() -> None:
    # base: 1000 + 800 weights + 8 x 50 frozen + 200 non-expert = 2400
    assert LAYERED.base_bytes == LAYERED.peak_bytes(0) == 2400
    # one expert: kept 300; activations 600 + 150 + 400 (its layer) = 1150 > grads 100, which
    # count one layer's share: 2400 - 600 + 300 + 1150 + 100 / 2 = 3300
    assert LAYERED.routed_peak_bytes([16.0], 128.0, 64.0, layers=1) == 3300
    # a second expert in the same layer adds no second gathered input: 300 + 150 + 50
    assert LAYERED.routed_peak_bytes([16.0] * 2, 128.0, 64.0, layers=1) == 3300 + 500
    # in the other layer it does: + 400
    assert LAYERED.routed_peak_bytes([16.0] * 2, 128.0, 64.0, layers=2) == 3300 + 900
    # not told: as many layers as can be (min(C, layers))
    assert LAYERED.peak_bytes(2) == LAYERED.routed_peak_bytes([16.0] * 2, 128.0, 64.0, 2)
    # a batch of half the rows halves the activations, not what is kept
    assert LAYERED.routed_peak_bytes([8.0], 64.0, 32.0, layers=1) == 2400 - 600 + 300 + 575 + 50


def test_gradients_count_whole_only_when_they_outgrow_the_activations() -> None:
    big = dataclasses.replace(LAYERED, expert_state_bytes=2100, expert_grad_bytes=2000)
    # kept 100 + 100; activations 600 + 8 x 150 + 2 x 400 = 2600 < grads 8 x 2000 = 16000
    assert big.peak_bytes(8) == 1800 + 8 * 200 + 16000 + 2600 // 2
    # and the marginal expert, once every layer trains one: kept + activations + grad / L
    assert LAYERED.per_trained_expert_bytes == 300 + 150 + 50
    assert LAYERED.peak_bytes(8) - LAYERED.peak_bytes(7) == 500


def test_the_memory_bound_of_a_layered_model_is_the_largest_c_that_fits() -> None:
    lim = limits(available_bytes=6000, margin_fraction=0.0)
    c = memory_max_experts(LAYERED, lim)
    assert LAYERED.peak_bytes(c) <= 6000 < LAYERED.peak_bytes(c + 1)
    assert compute_budget(LAYERED, limits(available_bytes=6000, margin_fraction=0.0,
                                          deadline_seconds=1e6)).c_budget == c
    assert memory_max_experts(LAYERED, limits(available_bytes=2000, margin_fraction=0.0)) == -1


def test_a_cost_model_without_layers_sums_per_expert_as_before() -> None:
    flat = dataclasses.replace(LAYERED, num_layers=0)
    # per expert: state 300 - grad 100 + max(grad 100, activations 200) - frozen 50 + start 100
    assert flat.per_trained_expert_bytes == 300 - 100 + 200 - 50 + 100
    assert flat.peak_bytes(3) == 2400 + 3 * 450
    assert layer_input_bytes(16, 4, 32) == 16 * 4 * 32 * 4
    assert layers_of([(0, 1), (0, 2), (1, 0)]) == 2 and layers_of([3, 4]) is None


def test_the_saved_activations_follow_what_autograd_keeps() -> None:
    """Counted with saved-tensor hooks on a real expert, frozen and trained."""
    import torch

    from device_agent.budget import frozen_activation_bytes, saved_ffn_rows
    from hfedmoe.experts import Expert, ExpertShape

    for gated, act in [(True, "silu"), (False, "gelu"), (True, "gelu")]:
        shape = ExpertShape(d_model=16, d_ff=24, activation=act, gated=gated)
        for trained in (False, True):
            expert = Expert(shape)
            for p in expert.parameters():
                p.requires_grad_(trained)
            x = torch.randn(10, 16, requires_grad=True)
            skip = {p.untyped_storage().data_ptr() for p in expert.parameters()}
            skip.add(x.untyped_storage().data_ptr())  # the input: the layer's gathered rows
            saved: dict[int, int] = {}

            def pack(t: torch.Tensor, saved=saved, skip=skip) -> torch.Tensor:
                if t.untyped_storage().data_ptr() not in skip:
                    saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                expert(x)
            assert sum(saved.values()) == 10 * 24 * 4 * saved_ffn_rows(
                gated, act, trained=trained), (gated, act, trained)
            if not trained:
                assert sum(saved.values()) == frozen_activation_bytes(
                    10, 24, gated=gated, activation=act)
            else:
                assert sum(saved.values()) == expert_activation_bytes(
                    10, 16, 24, gated=gated, with_input=False, activation=act)
