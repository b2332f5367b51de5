"""Planning real model sizes from config.json alone (hfedmoe.models.plan, device_agent.plan)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from benchmarks.plan import EXAMPLES_DIR
from device_agent.plan import plan_costs, timed_cost
from device_agent.work import COMPUTE_DTYPE, planned_mode
from hfedmoe.errors import ConfigError, ModelError
from hfedmoe.models.hf import FAMILIES, build_config, build_hf_model
from hfedmoe.models.plan import MODES, build_meta_model, is_config_only, plan_model


def _config_dir(tmp_path: Path, family: str, **overrides: object) -> Path:
    cfg = build_config(FAMILIES[family], **overrides)
    d = tmp_path / family
    d.mkdir()
    cfg.save_pretrained(d)
    assert is_config_only(d)
    return d


@pytest.mark.parametrize("family", ["qwen2-moe", "olmoe", "deepseek-v3", "deepseek-moe"])
def test_meta_plan_equals_real_model(tmp_path: Path, family: str) -> None:
    d = _config_dir(tmp_path, family)
    meta = build_meta_model(d)
    assert all(p.is_meta for p in meta.module.parameters())
    real = build_hf_model(family, "causal-lm")
    got, want = plan_model(meta), real.summary()
    for key in ("moe_layers", "experts_per_layer", "top_k", "params_per_expert",
                "total_params", "expert_params", "active_params_per_token"):
        assert got[key] == want[key], key
    assert got["weight_bytes"]["fp32"] == 4 * want["total_params"]
    assert got["weight_bytes"]["int4"] < got["weight_bytes"]["int8"] < got["weight_bytes"]["bf16"]
    if family in ("qwen2-moe", "deepseek-moe"):
        assert got["shared_expert_params"] > 0


def test_shipped_example_allocates_no_weights() -> None:
    import psutil

    rss0 = psutil.Process().memory_info().rss
    meta = build_meta_model(EXAMPLES_DIR / "gpt-oss-20b")
    info = plan_model(meta)
    grew = psutil.Process().memory_info().rss - rss0
    assert all(p.is_meta for p in meta.module.parameters())
    assert info["total_params"] > 20e9 and info["experts_per_layer"][0] == 32
    assert info["top_k"][0] == 4 and info["moe_layers"] == 24
    assert grew < info["weight_bytes"]["fp32"] / 50  # 83 GB of fp32 weights: not allocated


def test_unplannable_config_is_a_model_error(tmp_path: Path) -> None:
    d = tmp_path / "dense"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32,
                                               "num_hidden_layers": 1}))
    with pytest.raises(ModelError):
        build_meta_model(d)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    with pytest.raises(ModelError):
        build_meta_model(bad)


def test_profile_plans_every_mode(tmp_path: Path) -> None:
    from device_agent.profiles import load_profile

    d = _config_dir(tmp_path, "olmoe")
    report = load_profile("jetson-orin-nano-8gb")
    costs = plan_costs(build_meta_model(d), report, 2, 16, 60.0, 2)
    assert set(costs["modes"]) == {f"{a}-{b}" for a, b in MODES}
    for m in costs["modes"].values():
        assert m["runnable"] and m["budget"]["c_budget"] >= 0 and m["budget"]["limit"]
    modes = costs["modes"]
    assert (modes["lora-fp32"]["per_trained_expert_bytes"]
            < modes["full-fp32"]["per_trained_expert_bytes"])
    assert modes["lora-int8"]["weight_bytes"] < modes["lora-fp32"]["weight_bytes"]
    assert costs["expert_seconds"] is None  # an emulated device: nothing timed here


def test_planning_uses_the_rate_of_the_dtype_the_mode_computes_in(tmp_path: Path) -> None:
    from device_agent.profiles import load_profile

    model = build_meta_model(_config_dir(tmp_path, "olmoe"))
    orin = load_profile("jetson-agx-orin-32gb")
    costs = plan_costs(model, orin, 2, 16, 600.0, 10)
    modes = costs["modes"]
    assert [modes[f"{a}-{b}"]["dtype"] for a, b in MODES] == [COMPUTE_DTYPE[b] for _, b in MODES]
    for name, rate in (("lora-fp32", 2300e9), ("lora-bf16", 12000e9), ("lora-int8", 2300e9),
                       ("lora-int4", 12000e9)):  # the profile's sustained GFLOP/s per dtype
        adapter, base = name.split("-")
        want = planned_mode(model, adapter, base, 2, 16).cost(rate, 204.8e9)
        assert modes[name]["budget"]["cost"] == dataclasses.asdict(want), name
    assert plan_costs(model, orin, 2, 16, 600.0, 10) == costs  # no clock: the same every time


def test_a_mode_the_device_cannot_run_is_not_planned(tmp_path: Path) -> None:
    from device_agent.profiles import load_profile

    model = build_meta_model(_config_dir(tmp_path, "olmoe"))
    costs = plan_costs(model, load_profile("raspberry-pi-5-8gb"), 2, 16, 600.0, 10)
    for name, m in costs["modes"].items():  # Cortex-A76: no bf16 rate, so no bf16 or int4 mode
        assert m["runnable"] == (m["dtype"] == "float32"), name
        if not m["runnable"]:
            assert "no bfloat16 rate" in m["reason"] and "cannot run" in m["reason"]
    with pytest.raises(ConfigError, match=r"train.dtype = 'bfloat16'.*no bfloat16 rate"):
        planned_mode(model, "lora", "bf16", 2, 16).cost_on(load_profile("raspberry-pi-5-8gb"))


def test_profile_cli_on_config_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from device_agent.cli import model_costs, print_costs
    from device_agent.profiles import load_profile

    d = _config_dir(tmp_path, "qwen2-moe")
    args = argparse.Namespace(model=str(d), batch=2, seq=8, window=1.0, steps=2, margin=0.15,
                              device="cpu", matmul_seconds=0.0)
    costs = model_costs(load_profile("laptop-cpu-16gb"), args)
    assert costs["planned"] and len(costs["modes"]) == len(MODES)
    assert (costs["window_s"], costs["steps"], costs["margin"]) == (60.0, 2, 0.15)
    print_costs(costs)
    out = capsys.readouterr().out
    assert "lora-int8" in out and "quantized base" in out
    assert "1-minute window of 2 local steps" in out


@pytest.mark.parametrize(("flag", "value", "match"), [
    ("window", 1e-7, r"--window = 1e-07 min is shorter than one step in every mode"),
    ("window", 0.0, r"--window must be > 0"),
    ("steps", 0, r"--steps must be >= 1"),
    ("margin", 1.0, r"--margin must be in \[0, 1\)"),
])
def test_profile_cli_refuses_a_window_shorter_than_a_step(tmp_path: Path, flag: str,
                                                          value: float, match: str) -> None:
    from device_agent.cli import model_costs
    from device_agent.profiles import load_profile

    d = _config_dir(tmp_path, "qwen2-moe")
    args = argparse.Namespace(model=str(d), batch=2, seq=8, window=1.0, steps=2, margin=0.15)
    setattr(args, flag, value)
    with pytest.raises(ConfigError, match=match):
        model_costs(load_profile("phone-midrange-6gb"), args)


def test_inspect_cli_on_config_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hfedmoe.cli import main

    d = _config_dir(tmp_path, "mixtral")
    assert main(["models", "inspect", str(d), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["weights"] == "none (meta device)" and set(info["weight_bytes"]) == {
        "fp32", "bf16", "int8", "int4"}


# (weights, expert weight, state, activations, non-expert activations, frozen activations,
#  grads, snapshot, trained seconds, non-expert step seconds) of each mode of qwen2-moe's test
#  config at batch 2 x seq 16, one expert timed at 2 ms trained, 1.5 ms with LoRA, 1 ms frozen;
#  the non-expert activations hold 32 x 512 logits at 17 B (fp32 compute) or 20 B (bf16),
#  the 2 MoE layers' top-2 expert outputs per row (4 x 32 x d_model 32 at the compute dtype)
#  and the 5 norms' float32 inputs (5 x 32 rows x 32 x 4 B);
#  its SiLU experts (d_ff 48) save 4 x 48 values per row frozen and 5 x 48 trained
#  (device_agent.budget.saved_ffn_rows), plus 2 x rank 4 with LoRA
PINNED_QWEN2_COSTS = {  # its shared experts train in full (full) or through factors (lora)
    "full-fp32": (207232, 18432, 55296, 15360, 532224, 12288, 18432, 18432, 0.002,
                  0.01876388888888889),
    "full-bf16": (103616, 9216, 46080, 7680, 540416, 6144, 9216, 9216, 0.002,
                  0.01876388888888889),
    "lora-fp32": (207232, 18432, 9984, 15872, 412416, 12288, 3328, 3328, 0.0015,
                  0.01659722222222222),
    "lora-bf16": (103616, 9216, 9984, 7936, 420608, 6144, 3328, 3328, 0.0015,
                  0.01659722222222222),
    "lora-int8": (107904, 5248, 9984, 15872, 412416, 12288, 3328, 3328, 0.0015,
                  0.01659722222222222),
    "lora-int4": (89728, 3616, 9984, 7936, 420608, 6144, 3328, 3328, 0.0015,
                  0.01659722222222222),
}


def test_cost_models_of_a_planned_model_are_pinned(tmp_path: Path) -> None:
    model = build_meta_model(_config_dir(tmp_path, "qwen2-moe"))
    times = {"full": 2e-3, "lora": 1.5e-3, "frozen": 1e-3}

    for adapter, base in MODES:
        name = f"{adapter}-{base}"
        planned = planned_mode(model, adapter, base, 2, 16, "adamw", 4)
        cost = timed_cost(planned, times)
        fields = (cost.non_expert_weight_bytes, cost.expert_weight_bytes,
                  cost.expert_state_bytes, cost.expert_activation_bytes,
                  cost.non_expert_activation_bytes, cost.expert_frozen_activation_bytes,
                  cost.expert_grad_bytes, cost.expert_snapshot_bytes)
        assert fields == PINNED_QWEN2_COSTS[name][:-2], name
        assert cost.expert_trained_seconds == pytest.approx(PINNED_QWEN2_COSTS[name][-2])
        assert cost.rest_step_seconds == pytest.approx(PINNED_QWEN2_COSTS[name][-1], rel=1e-12)
        assert (cost.num_experts, cost.expert_rows, cost.batch_rows) == (8, 16, 32)
        # each layer's gathered input: 16 rows x its experts x d_model 32, at the compute dtype
        act = 2 if base in ("bf16", "int4") else 4
        assert (cost.num_layers, cost.layer_input_bytes) == (
            len(model.layers), 16 * model.layers[0].num_experts * 32 * act)
        assert (cost.process_baseline_bytes, cost.expert_optimizer_seconds) == (0, 0.0)
        assert cost.expert_frozen_seconds == 1e-3
        # the frozen expert's 294,912 FLOPs in 1 ms: the routing pass's FLOPs at that rate
        assert cost.routing_seconds == pytest.approx(0.012013888888888888, rel=1e-12)


def test_times_at_a_rate_are_a_roofline(tmp_path: Path) -> None:
    model = build_meta_model(_config_dir(tmp_path, "qwen2-moe"))
    planned = planned_mode(model, "full", "fp32", 2, 16, "adamw", 4)
    w = planned.work  # hand-counted: one expert 16 x 2 x (2 x 64 x 72 ... ) FLOPs
    assert (w.frozen_flops, w.frozen_bytes, w.trained_flops) == (294912.0, 36864.0, 442368.0)
    assert w.optimizer_bytes == 4608 * 28  # AdamW moves 28 B per fp32 parameter
    cost = planned.cost(1e9, 1e8)  # 1 GFLOP/s, 0.1 GB/s
    assert cost.expert_frozen_seconds == pytest.approx(36864 / 1e8)  # bandwidth binds
    assert cost.expert_optimizer_seconds == pytest.approx(4608 * 28 / 1e8)
    assert cost.expert_trained_seconds == pytest.approx(55296 / 1e8 + 4608 * 28 / 1e8)
    assert cost.rest_step_seconds == pytest.approx(w.rest_flops / 1e9 + w.rest_optimizer_bytes
                                                   / 1e8)  # compute binds, plus its optimizer
    fast = planned.cost(1e12, None)  # no bandwidth figure: FLOPs only, no optimizer time
    assert fast.expert_frozen_seconds == pytest.approx(294912 / 1e12)
    assert fast.expert_optimizer_seconds == 0.0


def test_every_normalization_layer_is_counted(tmp_path: Path) -> None:
    """Two per decoder layer and the final one in qwen2-moe's test config; OLMoE's q and k
    norms make four per layer."""
    from device_agent.work import norm_modules

    model = build_meta_model(_config_dir(tmp_path, "qwen2-moe"))
    assert norm_modules(model) == 2 * len(model.layers) + 1
    olmoe = build_meta_model("examples/models/olmoe-1b-7b-0924")
    assert norm_modules(olmoe) == 4 * 16 + 1
