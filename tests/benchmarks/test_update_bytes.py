"""The whole-update benchmark: what it extrapolates from two shallow runs is what a run of
the full depth sends, and its key count agrees with the full-depth model's."""

from __future__ import annotations

import pytest

from benchmarks import update_bytes
from hfedmoe.models.hf import FAMILIES, build_config


@pytest.fixture
def tiny_dir(tmp_path):
    """A Qwen2-MoE config of four decoder layers, the first dense (like DeepSeek's), with a
    shared expert per MoE layer: every part the benchmark separates."""
    cfg = build_config(FAMILIES["qwen2-moe"], num_hidden_layers=4, mlp_only_layers=[0],
                       vocab_size=300)
    cfg.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("mode", ["full", "lora+attention"])
def test_the_extrapolated_update_is_what_the_full_depth_sends(tiny_dir, mode):
    rows = update_bytes.model_rows(tiny_dir, mode, budget=2, rank=2, threads=1,
                                     isolate=False)
    real = update_bytes.measure_json(str(tiny_dir), 4, mode, 2, 2)  # the whole model
    assert [r["wire_dtype"] for r in rows] == ["float32", "bfloat16"]
    for r in rows:
        assert r["depths_run"] == [2, 3]  # layer 0 is dense: one and two MoE layers
        assert r["planned_matches"], (r["params_by_part"], r["planned_params_by_part"])
        assert r["params_by_part"] == real["params"]
        # the header's per-expert statistics vary by a few characters between runs
        assert abs(r["whole_update_bytes"] - real["wire"][r["wire_dtype"]]) < 200
        parts = r["params_by_part"]
        assert parts["shared_experts"] > 0 and parts["gates"] > 0
        assert (parts["attention"] > 0) == (mode == "lora+attention")
        assert r["experts_sent"] == 2
        assert r["whole_update_bytes"] < r["full_model_fedavg_bytes"]


def test_a_lora_update_carries_no_base_weight(tiny_dir):
    full, lora = (update_bytes.model_rows(tiny_dir, m, budget=2, rank=2, threads=1,
                                          isolate=False)[0] for m in ("full", "lora"))
    # LoRA factors replace the experts' and shared experts' weights; gates travel either way
    assert lora["params_by_part"]["experts"] < full["params_by_part"]["experts"]
    assert lora["params_by_part"]["shared_experts"] < full["params_by_part"]["shared_experts"]
    assert lora["params_by_part"]["gates"] == full["params_by_part"]["gates"]
    assert lora["whole_update_bytes"] < lora["dense_lora_fedavg_bytes"] + 4 * (
        lora["params_by_part"]["gates"] + lora["params_by_part"]["other"])


def test_unknown_mode_is_refused(capsys):
    with pytest.raises(SystemExit):
        update_bytes.main(["--modes", "qlora"])
    assert "unknown modes" in capsys.readouterr().err
