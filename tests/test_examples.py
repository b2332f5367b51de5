"""The example configs stay valid as the config schema changes."""

from pathlib import Path

from device_agent.config import AgentConfig
from hfedmoe.config import load_config
from server.config import ServerConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_example_configs_load():
    server = load_config(ServerConfig, EXAMPLES / "server.toml")
    agent = load_config(AgentConfig, EXAMPLES / "agent.toml")
    sim = load_config(ServerConfig, EXAMPLES / "simulate.toml")
    assert server.model == agent.model  # a device must build the server's model
    assert agent.runtime == "eager" and sim.data.alpha == 0.1
    lm = load_config(ServerConfig, EXAMPLES / "simulate-causal-lm.toml")
    assert lm.data.task == "causal-lm" and lm.train.adapter == "lora"
    assert lm.model.lora_targets == ("attention",)
