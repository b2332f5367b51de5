"""Emulation at a scale (device_agent.emulation): a small model stands in for a named reference
on a profiled device, whose memory, bandwidth and rates are scaled by their size ratio; the
budgets are planned from counts and rates, so they are the same in every run."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from benchmarks.plan import EXAMPLES_DIR
from device_agent.budget import CostModel
from device_agent.capacity import Capacity
from device_agent.config import AgentConfig
from device_agent.emulation import (
    DEFAULT_REFERENCE,
    REFERENCE_MODELS,
    EmulationScale,
    emulation_scale,
    planned_budget,
    scaled_report,
)
from device_agent.profiles import load_profile
from device_agent.work import PlannedMode, StepWork
from hfedmoe.config import ModelConfig, TrainConfig
from hfedmoe.errors import ConfigError

GIB, MIB = 1024**3, 1024**2


def test_reference_sizes_are_the_examples_counted() -> None:
    from hfedmoe.models.plan import build_meta_model, plan_model

    assert {p.name for p in EXAMPLES_DIR.iterdir()} == set(REFERENCE_MODELS)
    assert DEFAULT_REFERENCE in REFERENCE_MODELS
    for name, (_, params) in REFERENCE_MODELS.items():
        assert plan_model(build_meta_model(EXAMPLES_DIR / name))["total_params"] == params, name


def test_the_scale_multiplies_memory_bandwidth_and_rates() -> None:
    scale = emulation_scale("tiny", 6_919_162, DEFAULT_REFERENCE)
    assert scale.factor == pytest.approx(1e-3)
    assert scale.describe() == ("tiny (6.9 M parameters) / OLMoE-1B-7B-0924 (6.92 B) = 0.001")
    orin = load_profile("jetson-agx-orin-32gb")
    small = scaled_report(orin, scale)
    assert small.memory_available_bytes == int(27 * GIB * scale.factor)
    assert small.memory_bandwidth_gbps == pytest.approx(204.8e-3)
    assert small.gflops("bfloat16") == pytest.approx(12.0)
    assert small.peak_gflops["gpu"]["float32"] == pytest.approx(3.3331)
    assert EmulationScale.from_dict(small.emulation) == scale  # stored with the report
    assert emulation_scale("tiny", 10, "") is None


@pytest.mark.parametrize(("reference", "params", "match"), [
    ("no-such-model", 10, r"emulate_reference = 'no-such-model': not a model directory"),
    (DEFAULT_REFERENCE, 7_000_000_000, r"must be larger than the model it scales"),
])
def test_a_bad_reference_is_a_config_error(reference: str, params: int, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        emulation_scale("m", params, reference)


def test_an_agent_scales_only_an_emulated_profile() -> None:
    with pytest.raises(ConfigError, match="agent.emulate_reference scales an emulated profile"):
        AgentConfig(emulate_reference=DEFAULT_REFERENCE)
    with pytest.raises(ConfigError, match=r"agent.memory_margin must be in \[0, 1\)"):
        AgentConfig(memory_margin=1.0)


def _planned(per: int = MIB) -> PlannedMode:
    """10 experts; the host holds 100 MiB (weights and the non-expert part); each trained
    expert adds ``per``; a step is 1 GFLOP with no expert trained, 0.1 GFLOP more per expert."""
    memory = CostModel(num_experts=10, non_expert_weight_bytes=50 * MIB, expert_weight_bytes=MIB,
                       expert_state_bytes=per, expert_activation_bytes=0,
                       non_expert_activation_bytes=40 * MIB)
    work = StepWork(rest_flops=0.5e9, rest_bytes=0, rest_optimizer_bytes=0, routing_flops=0,
                    routing_bytes=0, frozen_flops=0.05e9, frozen_bytes=0, trained_flops=0.15e9,
                    trained_bytes=0, optimizer_bytes=0)
    return PlannedMode("full", "fp32", "float32", memory, work, 1_000_000)


def test_scaled_memory_after_the_margin_holds_the_trained_experts() -> None:
    phone = load_profile("phone-midrange-6gb")  # 2 GiB available, 60 fp32 GFLOP/s
    scale = EmulationScale("m", 1, "ref", 1024, "hand-made")  # 2 GiB -> 2 MiB
    budget = planned_budget(_planned(per=MIB // 4), phone, window_s=600.0, steps=2, scale=scale)
    # 2 MiB less 15 % = 1.7 MiB: 6 experts of 0.25 MiB; the host's 100 MiB are not charged
    assert (budget.c_budget, budget.limit, budget.memory_max) == (6, "memory", 6)
    assert budget.emulation == scale.to_dict()
    assert "emulated memory 2.0 MiB (2.0 GiB x 0.0009766) less 15% margin" in budget.reason
    # a step: 1 GFLOP + 0.1 GFLOP x 6 at 60 GFLOP/s / 1024
    assert budget.step_seconds == pytest.approx(1.6e9 / (60e9 / 1024))
    unscaled = planned_budget(_planned(per=MIB // 4), phone, window_s=600.0, steps=2)
    assert (unscaled.c_budget, unscaled.limit, unscaled.emulation) == (10, "all-experts", None)


def test_a_window_shorter_than_one_step_is_a_config_error() -> None:
    phone = load_profile("phone-midrange-6gb")
    with pytest.raises(ConfigError, match=r"rounds.train_time_s = 0.01 s is shorter than one "
                                          r"step: 0.0183 s with 1 expert"):
        planned_budget(_planned(), phone, window_s=0.01, steps=2,
                       window_field="rounds.train_time_s")
    budget = planned_budget(_planned(), phone, window_s=0.01, steps=2)  # the agent: no error
    assert (budget.c_budget, budget.steps, budget.limit) == (1, 0, "time")


@pytest.fixture(scope="module")
def demo_model(minilm_available):
    if not minilm_available:
        pytest.skip("assets extra not installed")
    import torch

    from hfedmoe.config import ModelConfig
    from hfedmoe.models.registry import build_model

    torch.manual_seed(0)
    return build_model(ModelConfig(max_length=64), "classification", 4)


def _capacity(model, profile: str, monkeypatch, noise: float) -> Capacity:
    """An emulated demo agent whose host timings are noise: what the host measures (times,
    resident memory) changes from run to run."""
    import device_agent.costs as costs

    def noisy(*_a, **_k):
        cost = CostModel(num_experts=48, non_expert_weight_bytes=1, expert_weight_bytes=1,
                         expert_state_bytes=1, expert_activation_bytes=1,
                         non_expert_activation_bytes=int(80e6 * noise),
                         rest_step_seconds=0.2 * noise, process_baseline_bytes=int(7e8 * noise))
        return costs.MeasuredCosts(cost, None, 128, 8, 64)

    monkeypatch.setattr(costs, "measure_costs", noisy)
    cfg = AgentConfig(device_id="dev0", emulate=profile, emulate_reference=DEFAULT_REFERENCE,
                      matmul_seconds=0, model=ModelConfig(max_length=64),
                      train=TrainConfig(batch_size=8))
    params = sum(p.numel() for p in model.module.parameters())
    scale = emulation_scale(cfg.model.name, params, cfg.emulate_reference)
    report = load_profile(profile)
    cap = Capacity(cfg, model, 100, SimpleNamespace(matmul={}), report, scale)
    cap.start()
    return cap


def test_demo_budgets_bind_differ_and_repeat(demo_model, monkeypatch) -> None:
    """The demo's six devices: at least 4 different budgets in [1, E - 1], planned at the
    emulation scale, and the same whatever the host measured."""
    from lab.launch import DEMO_PROFILES, DEMO_REFERENCE, DEMO_WINDOW_S

    assert DEMO_REFERENCE == DEFAULT_REFERENCE

    def plan(noise: float) -> list:
        caps = [_capacity(demo_model, p, monkeypatch, noise) for p in DEMO_PROFILES[:6]]
        return [c.decide(DEMO_WINDOW_S, c.cfg.train) for c in caps]  # a round's rebudget

    first, again = plan(1.0), plan(1.7)
    assert [b.c_budget for b in first] == [b.c_budget for b in again]
    assert [dataclasses.asdict(b) for b in first] == [dataclasses.asdict(b) for b in again]
    budgets = [b.c_budget for b in first]
    assert len({b for b in budgets if 1 <= b <= 47}) >= 4, budgets
    by_memory = sorted(zip(DEMO_PROFILES[:6], budgets, strict=True),
                       key=lambda pb: load_profile(pb[0]).memory_available_bytes)
    assert [b for _, b in by_memory] == sorted(budgets)  # more memory, more experts
    assert all(b.emulation and b.emulation["reference"] == "OLMoE-1B-7B-0924" for b in first)

