"""The shipped examples run as shipped: ``hfedmoe server --config examples/server.toml`` and two
``hfedmoe agent --config examples/agent.toml`` over a real Mosquitto finish a round, and the
agents train on the bundled corpus without the server's held-out split. Overrides are only
what a test needs: its broker, its run directory, one short round, distinct device ids."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from device_agent.agent import local_data
from device_agent.config import load_agent_config
from hfedmoe.config import load_config
from hfedmoe.data import load_task
from server.config import ServerConfig

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
pytestmark = [pytest.mark.slow, pytest.mark.broker]


def _hfedmoe(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "hfedmoe.cli", *args], env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115


def test_the_agent_example_keeps_the_held_out_split_out_of_training():
    server = load_config(ServerConfig, EXAMPLES / "server.toml")
    agent = load_agent_config(EXAMPLES / "agent.toml", [])
    data, _ = local_data(agent)
    held_out = load_task(server.data).test
    assert len(held_out) > 0 and len(data) > 0
    assert not {data.texts[i] for i in range(len(data))} & \
        {held_out.texts[i] for i in range(len(held_out))}


def test_server_and_agent_examples_finish_a_round(tmp_path, mosquitto):
    run_dir = tmp_path / "run"
    server = _hfedmoe(["server", "--config", str(EXAMPLES / "server.toml"),
                       "--set", f"transport.url={mosquitto}", "--set", f"run_dir={run_dir}",
                       "--set", "rounds.rounds=1", "--set", "train.max_steps=3"],
                      tmp_path / "server.log")
    agents = [_hfedmoe(["agent", "--config", str(EXAMPLES / "agent.toml"),
                        "--set", f"transport.url={mosquitto}", "--set", f"device_id=laptop-0{i}",
                        "--set", f"work_dir={tmp_path / f'agent{i}'}"],
                       tmp_path / f"agent{i}.log") for i in (1, 2)]
    try:
        assert server.wait(timeout=900) == 0, (tmp_path / "server.log").read_text()[-3000:]
    finally:
        for p in agents:
            p.terminate()
            p.wait(30)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if r.get("phase") == "round"]
    assert len(rounds) == 1 and rounds[0]["accepted"] == 2
    train_size = len(load_task(load_config(ServerConfig, EXAMPLES / "server.toml").data).train)
    for i in (1, 2):
        said = re.search(r"laptop-0\d: (\d+) local examples", (tmp_path / f"agent{i}.log")
                         .read_text())
        assert said and int(said.group(1)) == train_size
