"""A discrete GPU plans two memory pools, its own and the host's, and the one that runs out
first limits the budget; a unified-memory device (Jetson) keeps its single pool."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from device_agent.budget import (
    Budget,
    CostModel,
    Limits,
    budget_from_report,
    compute_budget,
    plan_round,
    update_host_bytes,
)
from device_agent.cli import report_rows
from device_agent.emulation import planned_budget
from device_agent.profiles import load_profile
from device_agent.report import DeviceReport
from device_agent.work import PlannedMode, StepWork
from hfedmoe.errors import ConfigError

MIB, GIB = 2**20, 2**30
# GPU pool: 1000 MiB resident + 100 MiB non-expert; 50 MiB per trained expert (its state)
COST = CostModel(num_experts=32, non_expert_weight_bytes=600 * MIB, expert_weight_bytes=10 * MIB,
                 expert_state_bytes=40 * MIB, expert_activation_bytes=10 * MIB,
                 non_expert_activation_bytes=100 * MIB, process_baseline_bytes=1000 * MIB,
                 rest_step_seconds=0.1, expert_frozen_seconds=0.001,
                 expert_trained_seconds=0.002,
                 host_resident_bytes=2000 * MIB, host_per_expert_bytes=120 * MIB)


def gpu_report(gpu_free: int | None, host_available: int | None, rss: int = 0,
               **kw: object) -> DeviceReport:
    return DeviceReport(platform="linux", accelerator="cuda", gpu_name="a discrete GPU",
                        gpu_memory_total_bytes=8 * GIB, gpu_memory_free_bytes=gpu_free,
                        memory_total_bytes=16 * GIB, memory_available_bytes=host_available,
                        process_rss_bytes=rss, **kw)  # type: ignore[arg-type]


def test_the_gpu_pool_binds_when_the_gpu_runs_out_first() -> None:
    # GPU: 2000 MiB usable (margin 0) - 1100 MiB base = 900 MiB -> 18 experts of 50 MiB;
    # host: 8000 MiB - 2000 MiB resident = 6000 MiB -> 50 of 120 MiB, capped at 32
    report = gpu_report(gpu_free=2000 * MIB, host_available=8000 * MIB)

    budget = budget_from_report(report, COST, 1000.0, 10, margin_fraction=0.0)

    assert (budget.c_budget, budget.limit) == (18, "memory")
    assert (budget.gpu_memory_max, budget.host_memory_max) == (18, 32)
    assert budget.peak_bytes == 1100 * MIB + 18 * 50 * MIB
    assert budget.host_peak_bytes == 2000 * MIB + 18 * 120 * MIB
    assert "gpu memory allows 18, host memory 32" in budget.reason


def test_the_host_pool_binds_when_the_host_runs_out_first() -> None:
    # GPU: 7000 - 1100 MiB -> 118 experts, capped at 32; host: (2500 MiB available + 500 MiB
    # the process held then) - 2000 MiB resident = 1000 MiB -> 8 experts of 120 MiB
    report = gpu_report(gpu_free=7000 * MIB, host_available=2500 * MIB, rss=500 * MIB)

    budget = budget_from_report(report, COST, 1000.0, 10, margin_fraction=0.0,
                                host_held_bytes=report.process_rss_bytes)

    assert (budget.c_budget, budget.limit) == (8, "host-memory")
    assert (budget.memory_max, budget.gpu_memory_max, budget.host_memory_max) == (8, 32, 8)
    assert budget.limits.host_available_bytes == 3000 * MIB
    assert "host-memory allows 8" in budget.reason


def test_the_margin_is_kept_free_in_both_pools() -> None:
    report = gpu_report(gpu_free=7000 * MIB, host_available=3000 * MIB)

    budget = budget_from_report(report, COST, 1000.0, 10, margin_fraction=0.1)

    # host: 3000 - 300 kept free - 2000 resident = 700 MiB -> 5 experts of 120 MiB
    assert (budget.c_budget, budget.limit, budget.host_memory_max) == (5, "host-memory", 5)


def test_nothing_fits_when_the_resident_host_memory_does_not() -> None:
    report = gpu_report(gpu_free=7000 * MIB, host_available=1500 * MIB)

    budget = budget_from_report(report, COST, 1000.0, 10, margin_fraction=0.0)

    assert (budget.c_budget, budget.limit, budget.host_memory_max) == (0, "host-memory", -1)
    assert budget.reason.startswith("nothing fits host memory")


def test_an_unmeasured_host_base_is_the_rss_at_probe_time() -> None:
    cost = dataclasses.replace(COST, host_resident_bytes=0)
    report = gpu_report(gpu_free=7000 * MIB, host_available=1000 * MIB, rss=600 * MIB)

    budget = budget_from_report(report, cost, 1000.0, 10, margin_fraction=0.0,
                                host_held_bytes=600 * MIB)

    # host: 1000 + 600 MiB, of which the 600 MiB held are resident -> 8 experts of 120 MiB
    assert (budget.c_budget, budget.limit) == (8, "host-memory")


def test_a_round_plan_names_the_host_pool_when_it_binds() -> None:
    limits = Limits(available_bytes=7000 * MIB, deadline_seconds=1000.0, steps_per_round=10,
                    margin_fraction=0.0, host_available_bytes=2000 * MIB + 3 * 120 * MIB)
    ranked = list(range(6))

    plan = plan_round(COST, limits, ranked, {e: 1.0 for e in ranked}, 1.0)

    assert (plan.experts, plan.limit) == ((0, 1, 2), "host-memory")


def test_one_pool_without_a_host_figure_as_before() -> None:
    limits = Limits(available_bytes=2000 * MIB, deadline_seconds=1000.0, steps_per_round=10,
                    margin_fraction=0.0)

    budget = compute_budget(COST, limits)

    assert (budget.c_budget, budget.limit) == (18, "memory")
    assert (budget.gpu_memory_max, budget.host_memory_max, budget.host_peak_bytes) == (
        None, None, None)
    assert "pools" not in budget.reason


def test_an_old_budget_dict_loads() -> None:
    budget = budget_from_report(gpu_report(7000 * MIB, 2500 * MIB), COST, 1000.0, 10)
    old = budget.to_dict()
    for key in ("gpu_memory_max", "host_memory_max", "host_peak_bytes"):
        del old[key]
    for key in ("host_resident_bytes", "host_per_expert_bytes"):
        del old["cost"][key]
    for key in ("host_available_bytes", "host_margin_bytes"):
        del old["limits"][key]

    loaded = Budget.from_dict(old)

    assert (loaded.c_budget, loaded.host_memory_max, loaded.limits.host_available_bytes) == (
        budget.c_budget, None, None)
    assert Budget.from_dict(budget.to_dict()) == budget


@pytest.mark.parametrize("free", [None, -1])
def test_a_discrete_gpu_without_its_memory_is_a_config_error(free: int | None) -> None:
    with pytest.raises(ConfigError, match="gpu_memory_free_bytes"):
        budget_from_report(gpu_report(gpu_free=free, host_available=8 * GIB), COST, 1000.0, 10)


# Single-pool budgets of the shipped Jetsons (unified memory), as main computed them before the
# host pool existed (one constructed cost, from a report and planned from the profile).
JETSON_COST = CostModel(
    num_experts=64, non_expert_weight_bytes=900 * MIB, expert_weight_bytes=40 * MIB,
    expert_state_bytes=120 * MIB, expert_activation_bytes=30 * MIB, expert_grad_bytes=40 * MIB,
    expert_snapshot_bytes=40 * MIB, non_expert_activation_bytes=300 * MIB,
    rest_step_seconds=0.5, expert_frozen_seconds=0.01, expert_trained_seconds=0.05,
    host_per_expert_bytes=update_host_bytes(10 * MIB))
JETSON_WORK = StepWork(rest_flops=4e12, rest_bytes=2e9, rest_optimizer_bytes=1e6,
                       routing_flops=2e12, routing_bytes=3e9, frozen_flops=2e10,
                       frozen_bytes=8e7, trained_flops=3e10, trained_bytes=1.2e8,
                       optimizer_bytes=1.2e9)
MAIN_JETSON = {  # (c_budget, limit, memory_max, time_max, peak_bytes), from report and planned
    "jetson-orin-nano-8gb": (9, "memory", 9, 64, 5452595200),
    "jetson-agx-orin-32gb": (64, "all-experts", 64, 64, 14680064000),
}


@pytest.mark.parametrize("name", sorted(MAIN_JETSON))
def test_unified_memory_keeps_its_single_pool_budget(name: str) -> None:
    report = load_profile(name)
    assert report.unified_memory and not report.discrete_gpu

    from_report = budget_from_report(report, JETSON_COST, 600.0, 10, host_held_bytes=10 * GIB)
    planned = planned_budget(PlannedMode("full", "fp32", "float32", JETSON_COST, JETSON_WORK,
                                         10**9), report, window_s=600.0, steps=10)

    for b in (from_report, planned):
        assert (b.c_budget, b.limit, b.memory_max, b.time_max, b.peak_bytes) == MAIN_JETSON[name]
        assert (b.host_memory_max, b.limits.host_available_bytes) == (None, None)


GPU_PROFILE = """name = "laptop-gpu"
platform = "linux"
accelerator = "cuda"
[memory]
total_gib = 15.5
available_gib = 9.0
bandwidth_gbps = 256.0
source = "a data sheet"
[gpu]
source = "a data sheet"
peak_gflops = { float32 = 15000.0 }
sustained_gflops = { float32 = 9000.0 }
sustained_source = "an assumption"
memory_total_gib = 8.0
memory_available_gib = 7.0
memory_source = "a data sheet"
"""


def test_a_discrete_gpu_profile_plans_both_pools(tmp_path: Path) -> None:
    path = tmp_path / "gpu.toml"
    path.write_text(GPU_PROFILE)
    report = load_profile(path)
    assert (report.budget_memory_bytes, report.host_memory_bytes) == (7 * GIB, 9 * GIB)
    rows = dict(report_rows(report))
    assert rows["budget memory: gpu pool"] == "7.00 GiB"
    assert rows["budget memory: host pool"] == "9.00 GiB"
    assert "budget memory" not in rows

    planned = planned_budget(PlannedMode("full", "fp32", "float32", COST, JETSON_WORK, 10**9),
                             report, window_s=600.0, steps=10, margin=0.0)

    # host: 9 GiB - the weights (600 + 32 x 10 MiB) read in as the model loads
    assert planned.limits.host_available_bytes == 9 * GIB
    assert planned.cost.host_resident_bytes == 920 * MIB
    assert planned.host_memory_max == 32 and planned.gpu_memory_max is not None


@pytest.mark.parametrize(("old", "new", "field"), [
    ("memory_available_gib = 7.0\n", "", "gpu.memory_available_gib"),
    ("memory_total_gib = 8.0\n", "", "gpu.memory_total_gib"),
    ("memory_available_gib = 7.0", "memory_available_gib = -1.0", "gpu.memory_available_gib"),
    ("memory_available_gib = 7.0", "memory_available_gib = 9.0", "gpu.memory_available_gib"),
    ('accelerator = "cuda"', 'accelerator = "cuda"\nunified_memory = true', "gpu.memory_"),
])
def test_bad_gpu_memory_is_a_config_error_naming_the_field(tmp_path: Path, old: str, new: str,
                                                          field: str) -> None:
    assert old in GPU_PROFILE
    path = tmp_path / "bad.toml"
    path.write_text(GPU_PROFILE.replace(old, new, 1))
    with pytest.raises(ConfigError, match=re.escape(field)):
        load_profile(path)


def test_the_plan_table_names_both_pools() -> None:
    from device_agent.plan import _limit_text

    budget = budget_from_report(gpu_report(7000 * MIB, 2500 * MIB, rss=500 * MIB), COST, 1000.0,
                                10, margin_fraction=0.0, host_held_bytes=500 * MIB)
    text = _limit_text({"runnable": True, "budget": budget.to_dict()})

    assert text == "host-memory (memory allows 8: gpu 32, host 8, time 32)"
