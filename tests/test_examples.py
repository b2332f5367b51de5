"""The example configs stay valid as the config schema changes."""

from pathlib import Path

from device_agent.config import AgentConfig
from hfedmoe.config import load_config
from lab.device_privacy import SimulationConfig
from server.config import ServerConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_example_configs_load():
    server = load_config(ServerConfig, EXAMPLES / "server.toml")
    agent = load_config(AgentConfig, EXAMPLES / "agent.toml")
    sim = load_config(SimulationConfig, EXAMPLES / "simulate.toml")
    assert server.model == agent.model  # a device must build the server's model
    assert agent.runtime == "eager" and sim.data.alpha == 0.1
    lm = load_config(SimulationConfig, EXAMPLES / "simulate-causal-lm.toml")
    assert lm.data.task == "causal-lm" and lm.train.adapter == "lora"
    assert lm.model.lora_targets == ("attention",)


def test_the_simulate_example_s_device_privacy_block_loads_uncommented(tmp_path):
    """``examples/simulate.toml``'s commented ``[devices]`` block is a valid section."""
    lines = (EXAMPLES / "simulate.toml").read_text().splitlines()
    start = lines.index("# [devices.privacy]")
    block = "\n".join(x.removeprefix("# ") for x in lines[start:])
    path = tmp_path / "sim-devices.toml"
    path.write_text(block)
    cfg = load_config(SimulationConfig, path)
    assert cfg.devices.privacy.min_noise_multiplier == 1.0
    late = cfg.devices.privacy_for(0, "phone-midrange-6gb", 0)
    assert (late.min_noise_multiplier, late.usage, late.max_clip) == (2.0, "withheld", 1.0)
