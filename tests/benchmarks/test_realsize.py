"""The real-size benchmark's path on a tiny config (benchmarks.realsize)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import realsize
from benchmarks._common import read_rows
from hfedmoe.models.hf import FAMILIES, build_config


@pytest.mark.slow
def test_realsize_runs_the_plan_against_real_steps(tmp_path: Path) -> None:
    model = tmp_path / "olmoe"
    model.mkdir()
    build_config(FAMILIES["olmoe"], hidden_size=64, intermediate_size=64, head_dim=16,
                 num_hidden_layers=2).save_pretrained(model)
    out = tmp_path / "realsize.jsonl"
    assert realsize.main(["--model", str(model), "--layers", "1", "--budgets", "1,4",
                          "--seq", "32", "--steps", "2", "--threads", "1",
                          "--out", str(out)]) == 0
    rows = read_rows(out)
    assert [r["budget"] for r in rows] == [1, 4]
    for r in rows:
        assert (r["quantize"], r["adapter"], r["impl"], r["layers"]) == ("int4", "lora",
                                                                         "sorted", 1)
        assert r["train_dtype"] == "bfloat16"  # int4's kernel runs on bf16 activations
        assert r["predicted_added_bytes"] > 0 and r["measured_added_bytes"] > 0
        assert r["added_error"] == pytest.approx(
            r["predicted_added_bytes"] / r["measured_added_bytes"] - 1, abs=1e-3)
        assert r["predicted_step_s"] > 0 and len(r["step_samples_s"]) == 1
        assert r["quantized"]["int8_fallback"] == 0  # every weight packed as int4
    with pytest.raises(SystemExit):
        realsize.main(["--model", str(model), "--steps", "1"])
