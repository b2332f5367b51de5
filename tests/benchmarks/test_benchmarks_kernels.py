"""The step benchmarks run end to end in quick mode and write the documented JSON fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import budget, detach, kernels

ENV_FIELDS = {"git_sha", "torch", "torch_threads", "cpu_count", "loadavg"}


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_kernels_quick(tmp_path: Path) -> None:
    out, png = tmp_path / "kernels.jsonl", tmp_path / "kernels.png"

    assert kernels.main(["--quick", "--out", str(out), "--plot", str(png), "--bf16-held"]) == 0

    every = read_rows(out)
    rows = [r for r in every if r["bench"] == "kernels"]
    labels = {r["label"] for r in rows}
    assert {"eager", "grouped", "sorted", "sorted+bf16", "sorted+detach",
            "sorted round recipe", "sorted+bf16 held"} <= labels
    # bf16 rows cast per use unless marked as holding the frozen weights in bf16
    assert {r.get("frozen_lowp", False) for r in rows if r["label"] == "sorted+bf16"} == {False}
    assert {r["frozen_lowp"] for r in rows if r["label"] == "sorted+bf16 held"} == {True}
    recipe = next(r for r in every if r["bench"] == "kernels-recipe")
    assert recipe["per_batch_recipe_s"] > 0 and recipe["round_step_s"] > 0
    assert recipe["ratio_step"] == pytest.approx(
        recipe["round_step_s"] / recipe["per_batch_recipe_s"], abs=0.02)
    assert sum(bool(r.get("skip_experts")) for r in rows) == 2  # the two "rest" rows
    for r in rows:
        assert ENV_FIELDS <= r["env"].keys()
        assert r["step_s"] > 0 and r["step_min_s"] <= r["step_s"] <= r["step_max_s"]
        assert r["routing_s"] > 0 and r["train_peak_bytes"] >= 0
        assert {"expert_gflops", "peak_gflops", "fraction_of_peak"} <= r.keys()
        if not r.get("skip_experts"):
            assert r["expert_flops"] > 0
            assert {"time_ratio_vs_all", "memory_ratio_vs_all"} <= r.keys()
    most = max(r["budget"] for r in rows)
    assert all(r["time_ratio_vs_all"] == 1.0 for r in rows if r["budget"] == most)
    exact = next(r for r in rows if r["label"] == "sorted" and r["budget"] == most)
    cut = next(r for r in rows if r["label"] == "sorted+detach" and r["budget"] == 1)
    ref = next(r for r in rows if r["label"] == "sorted" and r["budget"] == 1)
    assert cut["expert_bwd_flops"] < ref["expert_bwd_flops"] < exact["expert_bwd_flops"]
    for r in rows:  # the analytical bound, from the variant's own C = 0, C = E and rest rows
        if r.get("skip_experts") or r.get("recipe") or r["label"].endswith(" held"):
            continue
        assert {"bound_s", "bound_ratio_vs_all", "gap_to_bound"} <= r.keys(), r["label"]
        if r["budget"] in (0, most):  # the bound is made of these two measurements
            assert r["gap_to_bound"] == pytest.approx(0.0, abs=1e-3)
        assert r["gap_to_bound"] == pytest.approx(r["step_s"] / r["bound_s"] - 1, abs=2e-3)
    assert {r["budget"] for r in rows if r["label"] == "sorted"} == {0, 1, most}
    assert png.stat().st_size > 0


def test_budget_quick(tmp_path: Path) -> None:
    out = tmp_path / "budget.jsonl"

    assert budget.main(["--quick", "--adapters", "full,lora", "--out", str(out),
                        "--plot", str(tmp_path / "b.png")]) == 0

    everything = read_rows(out)
    rows = [r for r in everything if r["kind"] == "round"]
    assert [r["adapter"] for r in rows] == ["full"] * 4 + ["lora"] * 4
    full = [r for r in rows if r["adapter"] == "full"]
    lora = [r for r in rows if r["adapter"] == "lora"]
    assert [r["budget"] for r in full] == sorted(r["budget"] for r in full)
    # a LoRA expert holds its factors' state, not the whole expert's: less memory per expert
    for f, lo in zip(full, lora, strict=True):
        assert lo["per_trained_expert_bytes"] < f["per_trained_expert_bytes"]
    ratios = [r for r in everything if r["kind"] == "ratio"]
    assert {r["adapter"] for r in ratios} == {"full", "lora"} and all(
        r["peak_vs_full_fp32"] > 0 for r in ratios)
    profiles = [r for r in everything if r["kind"] == "profile"]
    assert {r["adapter"] for r in profiles} == {"full", "lora"}
    by = {(r["profile"], r["adapter"]): r for r in profiles}
    assert len(by) == len(profiles) and all((p, "lora") in by for p, _ in by)
    assert all(0 <= r["c_budget"] <= 8 and r["limit"] for r in profiles)
    for r in rows:
        assert {"predicted_step_s", "measured_step_s", "step_error", "predicted_peak_bytes",
                "measured_peak_bytes", "memory_error", "cost"} <= r.keys()
        # what training adds: the peak over the resident size just before training
        assert r["measured_added_bytes"] == r["measured_peak_bytes"] - r["resident_bytes"]
        assert r["predicted_added_bytes"] == r["predicted_peak_bytes"] - r["resident_bytes"]
        assert r["heap"] in ("bounded", "libc")  # the kit trains under its heap policy
        assert r["cost"]["routing_seconds"] > 0  # the pre-pass is part of the prediction
        assert r["predicted_step_s"] > 0 and r["measured_step_s"] > 0
        assert ENV_FIELDS <= r["env"].keys()


def test_detach_quick(tmp_path: Path, minilm_available: bool) -> None:
    if not minilm_available:
        pytest.skip("needs the MiniLM tokenizer from the assets extra")
    out = tmp_path / "detach.jsonl"

    assert detach.main(["--quick", "--out", str(out)]) == 0

    grad, *runs = read_rows(out)
    assert grad["kind"] == "grad_agreement" and -1.0 <= grad["cos_all_median"] <= 1.0
    assert [r["detach_frozen"] for r in runs] == [False, True]
    for r in runs:
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["steps"] == 3


def test_precision_quick(tmp_path: Path) -> None:
    from benchmarks import precision

    out = tmp_path / "precision.jsonl"
    assert precision.main(["--quick", "--rounds", "3", "--out", str(out)]) == 0
    rows = read_rows(out)
    steps = [r for r in rows if r["bench"] == "precision"]
    assert {(r["budget"], r["variant"]) for r in steps} == {
        (b, v) for b in (2, 8) for v in precision.VARIANTS}
    for r in steps:
        assert len(r["step_samples_s"]) == 3 and r["step_s"] > 0
        if r["variant"] != "fp32":  # paired ratio with its interval
            lo, hi = r["ratio_ci95"]
            assert lo <= r["ratio_to_fp32"] <= hi
    assert sum(r["bench"] == "precision-frozen" for r in rows) == 2
    ops = {r["op"]: r for r in rows if r["bench"] == "precision-ops"}
    assert set(ops) == {"gemm fp32", "gemm bf16", "attention flash fp32",
                        "attention flash bf16", "attention math bf16"}
    assert all(r["ms"] > 0 for r in ops.values()) and ops["gemm bf16"]["gflops"] > 0
