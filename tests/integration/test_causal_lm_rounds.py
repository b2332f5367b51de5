"""Causal-LM federated fine-tuning over a real Mosquitto: ``hfedmoe server`` and two
``hfedmoe agent`` processes run three HFedMoE rounds with LoRA on a tiny Qwen2-MoE (its experts,
shared experts and attention carry factors over the frozen base) on the bundled prompt/response
pairs, each agent on its non-IID (by topic) shard. The held-out loss falls and every metrics
row and the report carry ROUGE-L."""

from __future__ import annotations

import pytest

from tests.integration.conftest import merge, metrics, spawn, stop, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(600)]

MODEL = {"name": "qwen2-moe-tiny", "max_length": 160, "lora_targets": ["attention"]}
DATA = {"source": "chatterbot", "task": "causal-lm", "alpha": 0.5}


def test_server_and_agents_fine_tune_a_causal_lm(tmp_path, mosquitto):
    pytest.importorskip("chatterbot_corpus")
    pytest.importorskip("rouge_score")
    run_id, run_dir = "lm", tmp_path / "run"
    server = spawn("server", {
        "run_id": run_id, "run_dir": str(run_dir), "max_eval_examples": 48,
        "eval_generate_examples": 8, "eval_max_new_tokens": 16, "model": MODEL, "data": DATA,
        "train": {"adapter": "lora", "lr": 1e-2, "batch_size": 8, "max_steps": 4,
                  "threads": 1},
        "rounds": {"rounds": 3, "min_devices": 2, "deadline_s": 120.0, "train_time_s": 30.0,
                   "registration_timeout_s": 120.0},
        "transport": {"url": mosquitto, "keepalive": 5}}, tmp_path / "server.toml")
    agents = [spawn("agent", merge({"model": MODEL, "data": DATA}, {
        "device_id": f"lm-{i}", "run_id": run_id, "work_dir": str(tmp_path / f"a{i}"),
        "shard": i, "num_shards": 2, "emulate": "laptop-cpu-16gb", "matmul_seconds": 0.2,
        "train": {"threads": 1}, "transport": {"url": mosquitto, "keepalive": 5}}),
        tmp_path / f"a{i}.toml") for i in (0, 1)]
    try:
        wait_for(lambda: server.poll() is not None, 540, "the server to finish", agents)
        assert server.returncode == 0, (tmp_path / "server.log").read_text()[-3000:]
    finally:
        for p in (*agents, server):
            stop(p)
    rows = metrics(run_dir)
    assert [r["phase"] for r in rows] == ["initial", "round", "round", "round"]
    assert all(r["accepted"] == 2 for r in rows[1:])
    assert rows[-1]["loss"] < rows[0]["loss"]
    for r in rows:
        assert 0.0 <= r["rougeL"] <= 1.0 and r["rougeL_examples"] == 8
        assert len(r["per_domain"]) >= 10
    html = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "<h3>ROUGE-L per domain</h3>" in html
    assert f"<td class='num'>{rows[-1]['rougeL']:.4f}</td>" in html
