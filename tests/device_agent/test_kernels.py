"""float32 training on a CPU runs its matmuls without oneDNN, whose per-shape primitive cache
grows with a round's routing (device_agent.heap.training_kernels); other dtypes, devices and
the dynamic heap policy keep it."""

from __future__ import annotations

import pytest
import torch

from device_agent import costs, heap
from device_agent.train import RoundContext, RoundIds, train_round
from hfedmoe.config import TrainConfig
from hfedmoe.strategies import get_strategy
from hfedmoe.trainer import EagerTrainer
from tests.device_agent.test_train import text_data, tiny


@pytest.fixture
def bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HFEDMOE_HEAP", raising=False)  # the default policy
    monkeypatch.delenv("HFEDMOE_CPU_MATMUL", raising=False)
    assert torch.backends.mkldnn.enabled


@pytest.mark.parametrize(("policy", "dtype", "device", "inside"), [
    ("bounded", "float32", "cpu", False),
    ("bounded", "bfloat16", "cpu", True),
    ("bounded", "float16", "cpu", True),
    ("bounded", "float32", "cuda", True),
    ("dynamic", "float32", "cpu", True),
])
def test_only_float32_on_a_cpu_under_the_bounded_policy_turns_onednn_off(
        monkeypatch: pytest.MonkeyPatch, policy: str, dtype: str, device: str,
        inside: bool) -> None:
    monkeypatch.setenv("HFEDMOE_HEAP", policy)
    monkeypatch.setattr(heap, "_applied", None)  # a worker that has not applied it yet
    with heap.training_kernels(dtype, device):
        assert torch.backends.mkldnn.enabled is inside
    assert torch.backends.mkldnn.enabled
    with pytest.raises(RuntimeError), heap.training_kernels(dtype, device):
        raise RuntimeError("a failed step")
    assert torch.backends.mkldnn.enabled  # restored when the block fails too


@pytest.mark.parametrize(("dtype", "onednn"), [("float32", False), ("bfloat16", True)])
def test_a_round_trains_on_the_kernels_of_its_dtype_and_restores_them(
        tokenizer, bounded: None, monkeypatch: pytest.MonkeyPatch, dtype: str,
        onednn: bool) -> None:
    seen: list[bool] = []
    real_step = EagerTrainer.step

    def step(self: EagerTrainer, batch: dict) -> float:
        seen.append(torch.backends.mkldnn.enabled)
        return real_step(self, batch)

    monkeypatch.setattr(EagerTrainer, "step", step)
    res = train_round(RoundContext(tiny(tokenizer), text_data(), strategy=get_strategy("hfedmoe"),
                                   budget=2, train=TrainConfig(batch_size=2, dtype=dtype),
                                   ids=RoundIds(client_id="c1")))
    assert res.steps > 0 and seen == [onednn] * res.steps
    assert torch.backends.mkldnn.enabled


def test_costs_are_measured_on_the_kernels_a_float32_round_uses(
        tokenizer, bounded: None, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []

    def measure(*args: object) -> str:
        seen.append(torch.backends.mkldnn.enabled)
        return "measured"

    monkeypatch.setattr(costs, "_measure_costs", measure)
    assert costs.measure_costs(tiny(tokenizer), 2, 16) == "measured"
    assert seen == [False] and torch.backends.mkldnn.enabled


def test_the_float32_matmuls_can_stay_on_onednn_and_a_bad_choice_is_named(
        bounded: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HFEDMOE_CPU_MATMUL", "onednn")
    with heap.training_kernels("float32", "cpu"):
        assert torch.backends.mkldnn.enabled
    monkeypatch.setenv("HFEDMOE_CPU_MATMUL", "mkl")
    with pytest.raises(ValueError, match="HFEDMOE_CPU_MATMUL"), \
            heap.training_kernels("float32", "cpu"):
        pass
    assert torch.backends.mkldnn.enabled


def test_the_budget_benchmark_sets_each_matmul_choice_against_the_first() -> None:
    from benchmarks.budget import matmul_ratios

    def row(matmul: str, step: float, added: int, b: int = 12) -> dict:
        return {"adapter": "lora", "quantize": "none", "heap": "bounded", "requested_budget": b,
                "cpu_matmul": matmul, "measured_step_s": step, "measured_added_bytes": added}

    rows = [row("blas", 0.30, 100), row("blas", 0.40, 120), row("blas", 0.50, 110),
            row("onednn", 0.20, 130), row("onednn", 0.30, 150), row("onednn", 0.90, 140),
            row("blas", 1.0, 10, b=1)]  # no oneDNN rows at C = 1: no ratio
    got = matmul_ratios(rows, ["blas", "onednn"])
    assert len(got) == 1 and got[0]["budget"] == 12 and got[0]["processes"] == 3
    assert got[0]["step_ratio"] == pytest.approx(0.30 / 0.40, abs=1e-3)
    assert got[0]["added_ratio"] == pytest.approx(140 / 110, abs=1e-3)
    assert matmul_ratios(rows, ["blas"]) == []
