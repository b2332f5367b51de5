"""Planning real model sizes from config.json alone (hfedmoe.models.plan, device_agent.plan)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from benchmarks.plan import EXAMPLES_DIR
from device_agent.plan import plan_costs
from hfedmoe.errors import ModelError
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
    costs = plan_costs(build_meta_model(d), report, 2, 16, 60.0, 2,
                       times={"full": 2e-3, "lora": 1.5e-3, "frozen": 1e-3})
    assert set(costs["modes"]) == {f"{a}-{b}" for a, b in MODES}
    for m in costs["modes"].values():
        assert m["budget"]["c_budget"] >= 0 and m["budget"]["limit"]
    modes = costs["modes"]
    assert (modes["lora-fp32"]["per_trained_expert_bytes"]
            < modes["full-fp32"]["per_trained_expert_bytes"])
    assert modes["lora-int8"]["weight_bytes"] < modes["lora-fp32"]["weight_bytes"]


def test_profile_cli_on_config_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from device_agent.cli import model_costs, print_costs
    from device_agent.profiles import load_profile

    d = _config_dir(tmp_path, "qwen2-moe")
    args = argparse.Namespace(model=str(d), batch=2, seq=8, deadline=60.0, steps=2,
                              device="cpu", matmul_seconds=0.0)
    costs = model_costs(load_profile("laptop-cpu-16gb"), args)
    assert costs["planned"] and len(costs["modes"]) == len(MODES)
    assert costs["expert_seconds"]["full"] > 0
    print_costs(costs)
    out = capsys.readouterr().out
    assert "lora-int8" in out and "quantized base" in out


def test_inspect_cli_on_config_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hfedmoe.cli import main

    d = _config_dir(tmp_path, "mixtral")
    assert main(["models", "inspect", str(d), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["weights"] == "none (meta device)" and set(info["weight_bytes"]) == {
        "fp32", "bf16", "int8", "int4"}


# (weights, expert weight, state, activations, non-expert activations, frozen activations,
#  grads, snapshot, trained seconds) of each mode of qwen2-moe's test config at batch 2 x seq 16
PINNED_QWEN2_COSTS = {  # its shared experts train in full (full) or through factors (lora)
    "full-fp32": (207232, 18432, 55296, 11264, 347904, 6144, 18432, 18432, 0.002),
    "full-bf16": (103616, 9216, 46080, 5632, 315136, 3072, 9216, 9216, 0.002),
    "lora-fp32": (207232, 18432, 9984, 11776, 228096, 6144, 3328, 3328, 0.0015),
    "lora-bf16": (103616, 9216, 9984, 5888, 195328, 3072, 3328, 3328, 0.0015),
    "lora-int8": (106880, 5120, 9984, 11776, 228096, 6144, 3328, 3328, 0.0015),
    "lora-int4": (89728, 3584, 9984, 5888, 195328, 3072, 3328, 3328, 0.0015),
}


def test_cost_models_of_a_planned_model_are_pinned(tmp_path: Path) -> None:
    from device_agent.plan import cost_models

    model = build_meta_model(_config_dir(tmp_path, "qwen2-moe"))

    built = cost_models(model, {"full": 2e-3, "lora": 1.5e-3, "frozen": 1e-3}, 2, 16,
                        "adamw", 4)

    assert (built["tokens_per_expert"], built["lora_rank"]) == (16, 4)
    assert built["flops_per_second"] == pytest.approx(294912000.0, rel=1e-12)
    assert list(built["costs"]) == [f"{a}-{b}" for a, b in MODES]
    for name, cost in built["costs"].items():
        fields = (cost.non_expert_weight_bytes, cost.expert_weight_bytes,
                  cost.expert_state_bytes, cost.expert_activation_bytes,
                  cost.non_expert_activation_bytes, cost.expert_frozen_activation_bytes,
                  cost.expert_grad_bytes, cost.expert_snapshot_bytes)
        assert fields == PINNED_QWEN2_COSTS[name][:-1], name
        assert cost.expert_trained_seconds == pytest.approx(PINNED_QWEN2_COSTS[name][-1])
        assert (cost.num_experts, cost.expert_rows, cost.batch_rows) == (8, 16, 32)
        assert (cost.process_baseline_bytes, cost.expert_optimizer_seconds) == (0, 0.0)
        assert cost.expert_frozen_seconds == 1e-3
        assert cost.rest_step_seconds == pytest.approx(0.01876388888888889, rel=1e-12)
        assert cost.routing_seconds == pytest.approx(0.012013888888888888, rel=1e-12)
