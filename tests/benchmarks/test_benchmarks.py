"""The benchmarks run end to end in their quick mode and write the JSON lines they promise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hfedmoe.cli import main as cli_main

ENV_FIELDS = {"git_sha", "python", "torch", "cpu", "cpu_count", "torch_threads", "loadavg"}
MINE = ("latency", "comm", "aggregation", "learning", "lr_sweep")


def _rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows
    for r in rows:
        assert ENV_FIELDS <= set(r["env"]), set(r["env"])
    return rows


def _plot_ok(path: Path) -> None:
    assert path.is_file() and 0 < path.stat().st_size < 100_000


def test_bench_list_names_every_benchmark(capsys):
    assert cli_main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    names = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert set(MINE) | {"transport"} <= names
    assert "cli" not in names and not any(n.startswith("_") for n in names)


def test_unknown_benchmark_is_a_clear_error(capsys):
    assert cli_main(["bench", "no-such-bench"]) != 0
    assert "available:" in capsys.readouterr().err


@pytest.fixture
def needs_minilm(minilm_available):
    if not minilm_available:
        pytest.skip("the MiniLM assets wheel is not installed")


@pytest.mark.slow
def test_latency_quick(tmp_path):
    from benchmarks import latency

    assert latency.main(["--quick", "--out", str(tmp_path / "r.jsonl")]) == 0
    rows = _rows(tmp_path / "r.jsonl")
    assert [r["budget"] for r in rows] == [0, rows[0]["num_experts"]]
    for r in rows:
        assert r["forward_s"] > 0 and r["fwd_bwd_s"] > 0 and r["optimizer_s"] >= 0
        assert r["device"] == "cpu" and r["peak_rss_mb"] > 0 and "train_peak_delta_mb" in r
    assert rows[1]["trained_params"] > rows[0]["trained_params"]  # experts train on top
    assert rows[0]["step_ratio_vs_budget0"] == 1.0
    _plot_ok(tmp_path / "r.png")


@pytest.mark.slow
def test_comm_quick(tmp_path, needs_minilm):
    from benchmarks import comm

    assert comm.main(["--quick", "--out", str(tmp_path / "r.jsonl")]) == 0
    rows = _rows(tmp_path / "r.jsonl")

    def get(strategy: str, dtype: str, zstd: bool, adapter: str = "full") -> dict:
        return next(r for r in rows if (r["strategy"], r["wire_dtype"], r["zstd"], r["adapter"])
                    == (strategy, dtype, zstd, adapter))

    dense = get("fedavg-full", "float32", False)
    assert dense["ratio_vs_dense_fp32"] == 1.0
    assert dense["experts_in_update"] == dense["num_experts"]
    sparse = get("hfedmoe", "float32", False)
    assert sparse["experts_in_update"] <= sparse["num_experts"]
    assert sparse["bytes"] < dense["bytes"]
    assert get("hfedmoe", "bfloat16", False)["bytes"] < sparse["bytes"]
    assert get("hfedmoe", "bfloat16", True)["bytes"] < get("hfedmoe", "bfloat16", False)["bytes"]
    lora = get("hfedmoe", "float32", False, "lora")  # same shard, model and budget, rank 8
    assert lora["experts_in_update"] == sparse["experts_in_update"]
    assert lora["bytes"] < sparse["bytes"] and lora["lora_vs_full_bytes"] < 1
    assert 0 < lora["lora_vs_full_expert_params"] < 0.5
    assert len(rows) == 2 * 2 * 6  # two strategies x two adapters x (3 dtypes x zstd on/off)
    _plot_ok(tmp_path / "r.png")


def test_comm_plan_encodes_real_expert_shapes():
    from benchmarks.comm import planned

    rows = planned(8, ["olmoe-1b-7b", "switch-base-64"])
    assert {(r["model"], r["wire_dtype"]) for r in rows} == {
        (m, d) for m in ("olmoe-1b-7b", "switch-base-64") for d in ("float32", "bfloat16")}
    for r in rows:
        itemsize = 4 if r["wire_dtype"] == "float32" else 2
        # the encoded whole expert holds every parameter once (plus a small header)
        assert 0 <= r["full_expert_bytes"] - itemsize * r["params_per_expert"] < 4096
        d_in = r["d_ff"] * (2 if r["gated"] else 1)
        factors = 8 * (d_in + r["d_model"]) + 8 * (r["d_model"] + r["d_ff"])
        assert 0 <= r["lora_expert_bytes"] - itemsize * factors < 4096
        assert r["lora_vs_full_bytes"] < 0.02  # rank 8 on experts of real size


@pytest.mark.slow
def test_aggregation_quick(tmp_path, needs_minilm):
    from benchmarks import aggregation

    assert aggregation.main(["--quick", "--out", str(tmp_path / "r.jsonl")]) == 0
    rows = _rows(tmp_path / "r.jsonl")
    stream = {r["updates"]: r for r in rows if r["mode"] == "stream"}
    batch = [r for r in rows if r["mode"] == "batch"]
    assert set(stream) == {4, 16} and batch
    # the running sums are bounded by the model, not by the number of updates
    assert stream[16]["sums_or_updates_held_mb"] == stream[4]["sums_or_updates_held_mb"]
    for r in rows:
        assert r["peak_rss_delta_mb"] >= 0 and r["update_mb"] > 0
    assert "stream_peak_ratio_vs_batch" in batch[0]
    _plot_ok(tmp_path / "r.png")


@pytest.mark.slow
def test_learning_quick(tmp_path, needs_minilm):
    from benchmarks import learning

    assert learning.main(["--quick", "--jobs", "2", "--out", str(tmp_path / "r.jsonl")]) == 0
    rows = _rows(tmp_path / "r.jsonl")
    rounds = [r for r in rows if r["kind"] == "round"]
    summary = [r for r in rows if r["kind"] == "summary"]
    assert {r["strategy"] for r in summary} == {"hfedmoe", "fedavg-full"}
    for s in ("hfedmoe", "fedavg-full"):
        rs = sorted((r for r in rounds if r["strategy"] == s), key=lambda r: r["round"])
        assert [r["round"] for r in rs] == [-1, 0, 1]
        assert all(0.0 <= r["accuracy"] <= 1.0 for r in rs)
        assert all(r["bytes_in"] > 0 and len(r["budgets"]) == 3 for r in rs[1:])
    # the workers share the parent's pinned measurement: every run gets the same budgets
    assert len({json.dumps(r["budgets"], sort_keys=True) for r in rounds if r["round"] >= 0}) == 1
    for r in summary:
        assert 0 <= r["seeds_reaching_target"] <= 1 and r["target_accuracy"] > 0
        assert r["settings"]["devices"] == 3
        lo, hi = r["last5_accuracy_ci95"]
        assert lo <= r["last5_accuracy_mean"] <= hi
    assert "hfedmoe_minus_this_last5" in next(r for r in summary if r["strategy"] != "hfedmoe")
    # each device's trained experts per round, and the round's overlap and coverage
    for r in (r for r in rounds if r["round"] >= 0):
        assert sorted(r["selected"]) == sorted(r["held"]) and r["selection"]["clients"] == 3
        assert r["selection"]["union"] == len({e for s in r["selected"].values() for e in s})
    assert all({"jaccard", "union", "coverage"} <= set(r["selection_mean"]) for r in summary)
    _plot_ok(tmp_path / "r.png")


@pytest.mark.slow
def test_lr_sweep_quick(tmp_path, needs_minilm):
    from benchmarks import lr_sweep

    assert lr_sweep.main(["--quick", "--lrs", "1e-4", "--head-lrs", "0,1e-3", "--seeds", "0",
                          "--strategies", "hfedmoe", "--out", str(tmp_path / "r.jsonl")]) == 0
    rows = _rows(tmp_path / "r.jsonl")
    summary = [r for r in rows if r["kind"] == "summary"]
    assert {(r["lr"], r["head_lr"]) for r in summary} == {(1e-4, 0.0), (1e-4, 1e-3)}
    assert sum(r["best_in_group"] for r in summary) == 1
    rounds = [r for r in rows if r["kind"] == "round"]
    assert {(r["lr"], r["head_lr"]) for r in rounds} == {(1e-4, 0.0), (1e-4, 1e-3)}
    _plot_ok(tmp_path / "r.png")


@pytest.mark.slow
def test_signals_quick(tmp_path, needs_minilm):
    from benchmarks import signals

    assert signals.main(["--quick", "--upcycles", "copy", "--alphas", "0.1",
                         "--out", str(tmp_path / "s.jsonl")]) == 0
    (row,) = _rows(tmp_path / "s.jsonl")
    assert row["upcycle"] == "copy" and row["clients"] >= 1
    for key in ("ib_disagreement", "below_tau", "tau_removed", "usage_spread", "alpha_cv"):
        assert row[key] >= 0
    assert 0 <= row["usage_min"] <= row["usage_max"] <= 1


@pytest.mark.slow
def test_secagg_quick(tmp_path, needs_minilm):
    from benchmarks import secagg

    assert secagg.main(["--quick", "--out", str(tmp_path / "r.jsonl")]) == 0
    rows = _rows(tmp_path / "r.jsonl")
    assert [r["dropouts"] for r in rows] == [0, 2]
    for r in rows:
        assert r["secure_up_bytes"] > 0 and r["plain_up_bytes"] > 0
        assert 0 < r["experts_revealed"] <= r["experts_trained"]
        assert r["max_abs_err"] < 1e-6  # quantization: far inside the float tolerance
        assert r["ratio_up_bytes"] == round(r["secure_up_bytes"] / r["plain_up_bytes"], 2)
