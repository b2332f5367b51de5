"""The budget binds the round: one expert set chosen before training, trained, held and sent.

Plan arithmetic on hand-computed cases, then the recipe on a tiny model: every step trains the
same set, at most C_budget experts hold optimizer state, and the update carries exactly them.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from device_agent.budget import CostModel, Limits, compute_budget, plan_round
from device_agent.train import RoundContext, RoundIds, train_round
from hfedmoe.config import TrainConfig
from hfedmoe.errors import ConfigError
from hfedmoe.names import ExpertId, parse_key
from hfedmoe.strategies import get_strategy
from tests.device_agent.test_train import text_data, tiny

# 8 experts, measured with 10 rows each in a batch of 40 rows; resident 1000 B.
COST = CostModel(num_experts=8, non_expert_weight_bytes=1000, expert_weight_bytes=100,
                 expert_state_bytes=300, expert_activation_bytes=200,
                 non_expert_activation_bytes=200, rest_step_seconds=0.5,
                 expert_frozen_seconds=0.25, expert_trained_seconds=1.0, expert_rows=10,
                 batch_rows=40, process_baseline_bytes=1000)
E = [ExpertId(0, i) for i in range(4)] + [ExpertId(1, i) for i in range(4)]


def limits(**kw: object) -> Limits:
    base = {"available_bytes": 5000, "deadline_seconds": 60.0, "steps_per_round": 10,
            "margin_fraction": 0.0}
    return Limits(**{**base, **kw})  # type: ignore[arg-type]


def test_balanced_rows_reduce_to_the_balanced_step() -> None:
    rows = [10.0] * 3
    assert COST.routed_step_seconds(rows, 80.0, 40.0) == pytest.approx(COST.step_seconds(3))
    assert COST.routed_peak_bytes(rows, 80.0, 40.0) == COST.peak_bytes(3)


def test_imbalanced_routing_costs_what_the_chosen_experts_compute() -> None:
    # the two chosen experts compute 30 rows each (3x the balanced share); 80 rows in all
    step = COST.routed_step_seconds([30.0, 30.0], 80.0, 40.0)
    # 0.5 rest + 80/10 x 0.25 frozen + 60/10 x 0.75 extra = 7.0 s (balanced: 4.0 s)
    assert step == pytest.approx(7.0)
    # activations grow with rows: 300 - 0 + max(0, 200 x 3) ... grad not split -> 300 + 600
    assert COST.routed_peak_bytes([30.0], 80.0, 40.0) == 1000 + 200 + 900


def test_plan_keeps_a_prefix_that_fits_memory() -> None:
    rows = {e: 10.0 for e in E}
    # resident 1000 + non-expert 200 + 500 per trained expert <= 3000 -> 3 experts
    plan = plan_round(COST, limits(available_bytes=3000), E[:6], rows, 40.0)
    assert plan.experts == tuple(E[:3]) and plan.limit == "memory" and plan.steps == 10


def test_plan_quota_binds_on_top_of_the_resident_process() -> None:
    rows = {e: 10.0 for e in E}
    plan = plan_round(COST, limits(training_quota_bytes=1200), E[:6], rows, 40.0)
    assert plan.experts == tuple(E[:2]) and plan.limit == "quota"  # 200 + 2 x 500 <= 1200


def test_plan_trains_fewer_steps_rather_than_no_expert() -> None:
    rows = {e: 10.0 for e in E}
    # 2.5 s per step with no expert trained; one expert: 3.25 s; 20 s -> 6 steps
    plan = plan_round(COST, limits(deadline_seconds=20.0), E[:4], rows, 40.0)
    assert plan.experts == (E[0],) and plan.steps == 6 and plan.limit == "time"
    assert plan.round_seconds <= 20.0


def test_plan_without_enforcement_keeps_every_expert() -> None:
    rows = {e: 10.0 for e in E}
    plan = plan_round(COST, limits(available_bytes=1500), E, rows, 40.0, enforce=False)
    assert plan.experts == tuple(E) and plan.limit == "budget"


def test_training_quota_lowers_the_registered_budget() -> None:
    free = compute_budget(COST, limits(deadline_seconds=1000.0))
    quota = compute_budget(COST, limits(deadline_seconds=1000.0, training_quota_bytes=1700))
    # 5000 usable: (5000 - 1200) // 500 = 7; quota: (1000 + 1700 - 1200) // 500 = 3
    assert free.c_budget == 7 and (quota.c_budget, quota.limit) == (3, "quota")


@pytest.mark.parametrize("bad", [{"selection_batches": -1}, {"min_experts": -2},
                                 {"reselect": "epoch"}])
def test_bad_round_settings_are_config_errors(bad) -> None:
    from hfedmoe.config import from_dict

    with pytest.raises(ConfigError):
        from_dict(TrainConfig, bad)


def test_bad_agent_quota_is_a_config_error() -> None:
    from device_agent.config import AgentConfig

    with pytest.raises(ConfigError):
        AgentConfig(training_memory_mib=-1.0)


def _expert_keys(update) -> set[ExpertId]:
    return {parse_key(k).expert for k in update.deltas if parse_key(k).kind == "expert"}


@pytest.mark.parametrize("strategy", ["hfedmoe", "hfedmoe-importance", "fedavg-random",
                                      "hfedmoe-uniform"])
def test_one_expert_set_per_round_within_the_budget(tokenizer, strategy) -> None:
    model = tiny(tokenizer)
    before = model.state()
    res = train_round(RoundContext(
        model, text_data(), strategy=get_strategy(strategy), budget=2,
        train=TrainConfig(batch_size=2, lr=1e-2), ids=RoundIds(client_id="c1")))
    assert res.steps == 6
    assert len({tuple(s) for s in res.selections}) == 1  # the same set every step
    assert len(res.selected) == 2 and res.optimizer_experts <= 2
    assert _expert_keys(res.update) == set(res.update.updated) <= set(res.selected)
    after = model.state()
    moved = {parse_key(k).expert for k in before
             if parse_key(k).kind == "expert" and not torch.equal(before[k], after[k])}
    assert moved <= set(res.selected)
    assert res.update.num_examples == len(text_data())  # |D_c|, not examples processed
    assert res.update.meta["optimizer_experts"] == res.optimizer_experts


def test_per_batch_reselection_keeps_the_round_union_within_the_budget(tokenizer) -> None:
    model = tiny(tokenizer)
    res = train_round(RoundContext(
        model, text_data(), strategy=get_strategy("hfedmoe"), budget=3,
        train=TrainConfig(batch_size=2, lr=1e-2, reselect="batch")))
    union = {e for s in res.selections for e in s}
    assert len(union) <= 3 and res.optimizer_experts <= 3
    assert len(_expert_keys(res.update)) <= 3


def test_planner_shrinks_the_set_and_the_update_follows(tokenizer) -> None:
    model = tiny(tokenizer)
    seen = {}

    def planner(selection, stats):
        seen["rows"] = dict(stats.expert_rows)
        plan = plan_round(dataclasses.replace(COST, num_experts=8), limits(),
                          list(selection.ranked())[:1], seen["rows"], stats.batch_rows)
        return dataclasses.replace(plan, steps=2)

    res = train_round(RoundContext(
        model, text_data(), strategy=get_strategy("hfedmoe"), budget=3,
        train=TrainConfig(batch_size=2, lr=1e-2), planner=planner))
    assert res.steps == 2 and res.stopped_by == "plan" and len(res.selected) == 1
    assert len(_expert_keys(res.update)) <= 1
    assert sum(seen["rows"].values()) > 0  # the routing pass counted every expert's rows
