"""measure_costs end to end on a tiny model, with the clock and the memory readings replaced.

Every timed closure still runs on the real model; only the seconds and bytes they report are
fixed, so the resulting cost model is exact and pinned field by field.
"""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from device_agent import costs
from device_agent.throughput import StepCosts
from tests.device_agent.test_train import tiny

STEPS = StepCosts(device="cpu", repeats=2, expert_seconds=0.02, rest_seconds=0.3,
                  expert_frozen_seconds=0.01, expert_peak_bytes=1000, rest_peak_bytes=50000,
                  memory_method="rss-sampler", expert_samples=(0.02, 0.02),
                  rest_samples=(0.3, 0.3), routing_seconds=0.05)

# what the fixed readings give: bytes from the tiny model's counts, seconds anchored on the
# fixed whole steps (0.4 s with no expert trained; 0.5 s and 0.9 s with E/4 and all trained)
PINNED_FULL = {
    "num_experts": 8, "non_expert_weight_bytes": 3933580, "expert_weight_bytes": 18432,
    "expert_state_bytes": 55296, "expert_activation_bytes": 15360,
    "non_expert_activation_bytes": 1901696, "rest_step_seconds": 0.32,
    "expert_frozen_seconds": 0.01, "expert_trained_seconds": 0.07176470588235294,
    "routing_seconds": 0.05, "expert_frozen_activation_bytes": 12288,
    "expert_grad_bytes": 18432, "expert_rows": 16, "batch_rows": 32,
    "process_baseline_bytes": 123456789, "expert_optimizer_seconds": 0.0003125,
    "expert_snapshot_bytes": 18432, "trainer_fixed_bytes": 123840,
    "host_resident_bytes": 0, "host_per_expert_bytes": 0,  # one pool on a CPU
    # 2 MoE layers; one's gathered input: 16 rows x 4 experts x d_model 32 x 4 bytes
    "num_layers": 2, "layer_input_bytes": 8192,
    # the C = E/4 calibration's growth less its prediction, per balanced expert's rows
    "trainer_row_bytes": 143928,
}
TRAINER_GROWTH = 2_200_000  # what the real trainer's calibration steps add (fixed reading)
TRAINER_ROWS_GROWTH = 2_600_000  # the same at C = E/4
PINNED_LORA = {**PINNED_FULL, "expert_state_bytes": 4992, "expert_activation_bytes": 15616,
               "expert_grad_bytes": 1664, "expert_snapshot_bytes": 1664,
               "trainer_fixed_bytes": 182240, "trainer_row_bytes": 169884}


@pytest.fixture
def fixed_readings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace the clock and memory readings; return the log of closures timed."""
    timed: list[str] = []
    # no expert trained, then E/4 and all trained, then the trainer's calibration steps (C = 1,
    # then C = E/4)
    # (each calibration is the median of CALIBRATION_REPEATS readings: the middle one counts)
    r = costs.CALIBRATION_REPEATS
    step_seconds = iter([0.4, 0.5, 0.9] + [1.0] * (2 * r))
    growth = iter([2_000_000, 0, 0] + [0, TRAINER_GROWTH, 9 * TRAINER_GROWTH]
                  + [TRAINER_ROWS_GROWTH, 0, 9 * TRAINER_ROWS_GROWTH])
    now = [0.0]

    def perf_counter() -> float:
        now[0] += 0.001  # every optimizer step reads 1 ms
        return now[0]

    def measure_step_costs(run_expert, run_rest, device, repeats, *, run_expert_frozen,
                           run_routing):
        for name, fn in [("expert", run_expert), ("rest", run_rest),
                         ("frozen", run_expert_frozen), ("routing", run_routing)]:
            fn()
            timed.append(name)
        return STEPS

    def time_calls(fn, dev, repeats, warmup):
        for _ in range(warmup + repeats):
            fn()
        timed.append("step")
        return [next(step_seconds)] * repeats, next(growth)

    monkeypatch.setattr(costs, "time", types.SimpleNamespace(perf_counter=perf_counter))
    monkeypatch.setattr(costs, "measure_step_costs", measure_step_costs)
    monkeypatch.setattr(costs, "_time_calls", time_calls)
    monkeypatch.setattr(costs, "resident_bytes", lambda: 123_456_789)
    return timed


def test_measured_costs_are_pinned(tokenizer, fixed_readings: list[str]) -> None:
    model = tiny(tokenizer)
    before = model.state()

    got = costs.measure_costs(model, 2, 16, repeats=2)

    assert fixed_readings == (["expert", "rest", "frozen", "routing"]
                              + ["step"] * (3 + 2 * costs.CALIBRATION_REPEATS))
    assert (got.steps, got.tokens_per_expert, got.batch_size, got.seq_len) == (STEPS, 16, 2, 16)
    assert (got.adapter, got.lora_rank) == ("full", 0)
    assert dataclasses.asdict(got.cost) == pytest.approx(PINNED_FULL)
    after = model.state()  # the timing steps leave the model as it was
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_measured_lora_costs_are_pinned(tokenizer, fixed_readings: list[str]) -> None:
    from hfedmoe.lora import LoRASpec

    model = tiny(tokenizer)

    got = costs.measure_costs(model, 2, 16, repeats=2, adapter="lora", lora=LoRASpec(2, 4.0))

    assert (got.adapter, got.lora_rank) == ("lora", 2)
    assert dataclasses.asdict(got.cost) == pytest.approx(PINNED_LORA)
    assert all(e.factors is None for layer in model.layers for e in layer.bank.experts)


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_the_trainer_fixed_part_comes_from_real_trainer_steps(
        tokenizer, monkeypatch: pytest.MonkeyPatch, adapter: str) -> None:
    """Two steps of the round's own trainer with one expert, the heap trimmed after each as
    the round does; the fixed part is their growth less the model's prediction at C = 1."""
    from hfedmoe.config import TrainConfig
    from hfedmoe.trainer import EagerTrainer

    model = tiny(tokenizer)
    batch = costs._sample_batch(model, 2, 16)
    cost = costs.CostModel(**PINNED_FULL)
    seen: list[tuple[str, int]] = []
    real_step = EagerTrainer.step

    def step(self: EagerTrainer, b: dict) -> float:
        seen.append(("step", len(self.active)))
        return real_step(self, b)

    def time_calls(fn, dev, repeats, warmup):
        fn()
        return [0.1], 5_000_000

    monkeypatch.setattr(EagerTrainer, "step", step)
    monkeypatch.setattr(costs.heap, "after_step", lambda: seen.append(("trim", 0)))
    monkeypatch.setattr(costs, "_time_calls", time_calls)
    monkeypatch.setattr(costs, "resident_bytes", lambda: 123_456_789)

    fixed = costs.calibrate_trainer_bytes(model, batch, cost,
                                          TrainConfig(lr=1e-6, adapter=adapter), repeats=1)

    assert seen == [("step", 1), ("trim", 0)] * 2
    # the prediction at C = 1 under the batch's routing, without the fixed part
    with torch.no_grad(), model.capture(batch["attention_mask"]) as cap:
        model.module(**{k: v for k, v in batch.items() if k != "labels"})
    rows = [float(n) for layer in sorted(cap.expert_rows) for n in cap.expert_rows[layer]]
    added = cost.routed_peak_bytes([max(rows)], sum(rows), 32.0) - cost.resident_bytes
    assert fixed == 5_000_000 - added > 0
    # the trainer's round is over: nothing trains, no factors stay on the model
    assert not any(e.trainable for layer in model.layers for e in layer.bank.experts)
    assert all(e.factors is None for layer in model.layers for e in layer.bank.experts)
    assert costs.calibrate_trainer_bytes(model, batch, dataclasses.replace(
        cost, non_expert_activation_bytes=6_000_000), TrainConfig(lr=1e-6), repeats=1) == 0


def test_the_row_part_is_what_the_trainer_adds_at_e4_beyond_the_prediction(
        tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two steps of the round's trainer with the E/4 experts that compute the most rows; the
    row part is their growth less the prediction (fixed part included), per expert-row share."""
    from hfedmoe.config import TrainConfig
    from hfedmoe.trainer import EagerTrainer

    model = tiny(tokenizer)
    batch = costs._sample_batch(model, 2, 16)
    cost = costs.CostModel(**{**PINNED_FULL, "trainer_row_bytes": 0})
    seen: list[int] = []
    real_step = EagerTrainer.step

    def step(self: EagerTrainer, b: dict) -> float:
        seen.append(len(self.active))
        return real_step(self, b)

    monkeypatch.setattr(EagerTrainer, "step", step)
    monkeypatch.setattr(costs, "_time_calls", lambda fn, dev, r, w: (fn(), ([0.1], 6_000_000))[1])
    monkeypatch.setattr(costs, "resident_bytes", lambda: 123_456_789)

    per_row = costs.calibrate_trainer_rows(model, batch, cost, TrainConfig(lr=1e-6), repeats=1)

    assert seen == [2, 2]  # E/4 of 8 experts, at least 2
    rows = costs._batch_rows(model, batch)
    chosen = sorted(rows, key=lambda e: (-rows[e], e))[:2]
    share = sum(rows[e] for e in chosen) / cost.expert_rows
    added = cost.routed_peak_bytes([rows[e] for e in chosen], sum(rows.values()), 32.0,
                                   len({e.layer_idx for e in chosen})) - cost.resident_bytes
    assert per_row == int((6_000_000 - added) / share) > 0
    # with the row part in the model, the same growth is predicted: nothing left over
    fitted = dataclasses.replace(cost, trainer_row_bytes=per_row)
    assert costs.calibrate_trainer_rows(model, batch, fitted, TrainConfig(lr=1e-6)) <= 1
    # a prediction at or above the growth, or a model without layers: 0
    assert costs.calibrate_trainer_rows(model, batch, dataclasses.replace(
        cost, non_expert_activation_bytes=9_000_000), TrainConfig(lr=1e-6)) == 0
    assert costs.calibrate_trainer_rows(model, batch, dataclasses.replace(
        cost, num_layers=0), TrainConfig(lr=1e-6)) == 0
    assert not any(e.trainable for layer in model.layers for e in layer.bank.experts)


def test_the_flat_snapshot_holds_one_buffer_per_dtype_and_skips_quantized_weights(
        tokenizer) -> None:
    from hfedmoe.models.quantize import quantize_model
    from hfedmoe.quantize import is_quantized

    model = tiny(tokenizer)
    quantize_model(model, "int8")
    quantized = [k for k in model.keys() if is_quantized(model.parameter(k))]
    assert quantized  # the experts are stored int8
    snap = costs._FlatSnapshot(model)
    assert set(snap.flat) == {torch.float32}
    assert {k for k, *_ in snap.layout} == set(model.keys()) - set(quantized)
    saved = {k: model.parameter(k).detach().clone() for k, *_ in snap.layout}
    with torch.no_grad():
        for k in saved:
            model.parameter(k).add_(1.0)
    snap.restore(model)
    for k, v in saved.items():
        assert torch.equal(model.parameter(k), v), k


def test_a_calibration_keeps_the_median_of_its_readings(tokenizer,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Readings of the same steps move with the heap's state: the middle one of three counts,
    whichever order they come in; a trainer that cannot train the model gives none."""
    from hfedmoe.config import TrainConfig

    model = tiny(tokenizer)
    batch = costs._sample_batch(model, 2, 16)
    cost = costs.CostModel(**PINNED_FULL)
    readings = iter([9_000_000, 1_000_000, 4_000_000])
    monkeypatch.setattr(costs, "_trainer_residual", lambda *a: next(readings))
    assert costs.calibrate_trainer_bytes(model, batch, cost, TrainConfig(lr=1e-6)) == 4_000_000
    calls = []
    monkeypatch.setattr(costs, "_trainer_residual", lambda *a: calls.append(a) and None)
    assert costs.calibrate_trainer_bytes(model, batch, cost, TrainConfig(lr=1e-6)) == 0
    assert len(calls) == 1  # no second try of a trainer that cannot run
