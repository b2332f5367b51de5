"""The main job end to end: ``hfedmoe demo`` over a real Mosquitto, and ``hfedmoe simulate``."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import tomli_w

from tests.integration.conftest import SMALL, merge, metrics


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_short_demo_over_mosquitto_raises_accuracy(tmp_path, mosquitto):
    """The demo's six devices, two rounds: budgets spread and bind, updates stay sparse."""
    run_dir = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "hfedmoe.cli", "demo", "--broker", mosquitto, "--devices", "6",
         "--rounds", "2", "--run-dir", str(run_dir)],
        capture_output=True, text=True, env=env, timeout=880)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = metrics(run_dir)
    initial = [r for r in rows if r["phase"] == "initial"][0]
    rounds = [r for r in rows if r["phase"] == "round"]
    assert len(rounds) == 2 and all(r["accepted"] == 6 for r in rounds)
    budgets = set(rounds[0]["budgets"].values())
    assert len(budgets) >= 4 and all(1 <= b <= 47 for b in budgets), budgets
    assert all(r["bytes_in"] <= 0.35 * r["dense_bytes"] for r in rounds)
    assert rounds[-1]["accuracy"] > initial["accuracy"]
    assert (run_dir / "report.html").exists() and "report:" in proc.stdout
    for device in (run_dir / "agents").glob("*/agent.jsonl"):
        statuses = [json.loads(x)["status"] for x in device.read_text().splitlines()]
        assert statuses == ["accepted", "accepted"]
    assert_budget_binds(rounds, num_experts=48)
    assert "fedavg-full would send" in proc.stdout
    # retention: spooled updates go once their round is durable, the last 2 checkpoints and
    # the best stay, and the demo says how big its run directory ended
    assert not list((run_dir / "updates").rglob("*.bin"))
    assert len(list((run_dir / "checkpoints").glob("*.safetensors"))) <= 3
    assert "run directory" in proc.stdout.split("report:")[-1]
    # the field-trial table: `hfedmoe report` on the demo's run directory
    rep = subprocess.run([sys.executable, "-m", "hfedmoe.cli", "report", str(run_dir)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert rep.returncode == 0 and "per-device latency:" in rep.stdout, rep.stderr[-2000:]
    html = (run_dir / "report.html").read_text()
    assert "Step latency on the devices" in html and "Per device class" in html
    with open(run_dir / "latency.csv") as fh:
        lat = list(csv.DictReader(fh))
    assert len(lat) == 12  # 6 devices x 2 rounds
    assert {r["device"] for r in lat} == {p.parent.name for p in
                                          (run_dir / "agents").glob("*/agent.jsonl")}
    assert all(float(r["step_median_s"]) > 0 and float(r["forward_median_s"]) > 0 for r in lat)
    assert sum(r["upload_s"] != "" for r in lat) == 6  # round 0's uploads, sent in round 1


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_with_lora_experts_sends_factors_and_learns(tmp_path, mosquitto):
    """``--set train.adapter=lora`` over a real broker: the agents take the setting from the
    server, send factors of their selected experts, and the server merges exact products."""
    run_dir = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "hfedmoe.cli", "demo", "--broker", mosquitto, "--devices", "3",
         "--rounds", "2", "--run-dir", str(run_dir), "--set", "train.adapter=lora"],
        capture_output=True, text=True, env=env, timeout=880)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = metrics(run_dir)
    initial = [r for r in rows if r["phase"] == "initial"][0]
    rounds = [r for r in rows if r["phase"] == "round"]
    assert len(rounds) == 2 and all(r["accepted"] == 3 for r in rounds)
    # the budget counts LoRA's costs (factor state, no weight copies), so a device may now
    # afford every expert; it still sends at most its budget and holds state for no more
    assert_budget_binds(rounds, num_experts=48, allow_all=True)
    for r in rounds:  # rank-8 factors: 6.8% of a 384 x 192 expert's weights at most
        assert r["bytes_in"] <= 0.08 * r["dense_bytes"], (r["bytes_in"], r["dense_bytes"])
        assert r["experts_updated"] > 0
    assert rounds[-1]["accuracy"] > initial["accuracy"] + 0.1


def assert_budget_binds(rounds: list[dict], num_experts: int, allow_all: bool = False) -> None:
    """Every device and round: experts sent and experts with optimizer state <= C_budget; the
    budgets are below E (``allow_all``: at most E), and the round's updates a fraction of
    dense fedavg-full's."""
    for r in rounds:
        assert set(r["held"]) == set(r["budgets"])
        for device, held in r["held"].items():
            assert held["budget"] == r["budgets"][device]
            assert held["budget"] <= num_experts if allow_all else held["budget"] < num_experts
            assert 0 < held["experts_sent"] <= held["budget"], (device, held)
            assert 0 <= held["optimizer_experts"] <= held["budget"], (device, held)
        assert r["bytes_in"] <= 0.5 * r["dense_bytes"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_simulate_writes_a_run_directory_the_report_reads(tmp_path):
    cfg = merge(SMALL, {"run_dir": str(tmp_path / "sim"), "max_eval_examples": 32,
                        "rounds": {"rounds": 2, "train_time_s": 5.0},
                        "train": {"max_steps": 3}, "method": {"strategy": "fedmoe"}})
    path = tmp_path / "sim.toml"
    path.write_text(tomli_w.dumps(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "hfedmoe.cli", "simulate", "--config", str(path), "--devices", "3",
         "--profiles", "phone-midrange-6gb,jetson-orin-nano-8gb"],
        capture_output=True, text=True, timeout=580, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [r for r in metrics(tmp_path / "sim") if r["phase"] == "round"]
    assert [r["round"] for r in rows] == [0, 1] and all(r["accepted"] == 3 for r in rows)
    assert rows[0]["bytes_in"] > 0 and rows[0]["bytes_out"] == 0  # devices start from the base
    for r in rows:  # fedmoe trains its fixed sub-model within the budget too
        for device, held in r["held"].items():
            assert held["experts_sent"] <= held["budget"] and held["optimizer_experts"] <= \
                held["budget"], (device, held)
    report = (tmp_path / "sim" / "report.html").read_text()
    assert "Held-out evaluation" in report and "data:image/png;base64" in report


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_simulate_default_model_budgets_bind_the_round(tmp_path):
    """The default model and the shipped profiles at the emulation scale: budgets spread
    below E and bind."""
    cfg = {"run_dir": str(tmp_path / "sim"), "max_eval_examples": 32,
           "model": {"max_length": 64}, "train": {"lr": 1e-3, "max_steps": 2, "threads": 2},
           "rounds": {"rounds": 1, "train_time_s": 600.0, "deadline_s": 600.0,
                      "fraction": 1.0, "emulate_reference": "olmoe-1b-7b-0924"}}
    path = tmp_path / "sim.toml"
    path.write_text(tomli_w.dumps(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "hfedmoe.cli", "simulate", "--config", str(path), "--devices",
         "6"], capture_output=True, text=True, timeout=580,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [r for r in metrics(tmp_path / "sim") if r["phase"] == "round"]
    assert_budget_binds(rows, num_experts=48)
    budgets = set(rows[0]["budgets"].values())
    assert len(budgets) >= 4 and all(1 <= b <= 47 for b in budgets)
    assert rows[0]["bytes_in"] <= 0.35 * rows[0]["dense_bytes"]


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_causal_lm_demo_over_mosquitto_lowers_the_loss(tmp_path, mosquitto):
    """``hfedmoe demo --task causal-lm``: three devices fine-tune the tiny Qwen2-MoE with LoRA
    for two rounds; the held-out loss falls and ROUGE-L is reported every round."""
    pytest.importorskip("rouge_score")
    run_dir = tmp_path / "lm"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "hfedmoe.cli", "demo", "--task", "causal-lm", "--broker",
         mosquitto, "--devices", "3", "--rounds", "2", "--run-dir", str(run_dir),
         "--set", "max_eval_examples=48", "--set", "eval_generate_examples=8"],
        capture_output=True, text=True, env=env, timeout=880)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = metrics(run_dir)
    assert [r["phase"] for r in rows] == ["initial", "round", "round"]
    assert all(r["accepted"] == 3 for r in rows[1:])
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert all(0.0 <= r["rougeL"] <= 1.0 and r["rougeL_examples"] == 8 for r in rows)
    assert "ROUGE-L" in proc.stdout and "<h2>Language model</h2>" in (
        run_dir / "report.html").read_text()
