"""The device agent's configuration (``hfedmoe agent --config agent.toml --set k=v``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from device_agent.budget import DEFAULT_MEMORY_MARGIN
from device_agent.privacy import DevicePrivacyConfig
from hfedmoe.config import DataConfig, ModelConfig, TrainConfig, load_config, resolve_adapter
from hfedmoe.eligibility import EligibilityConfig
from hfedmoe.errors import ConfigError
from hfedmoe.transport.config import TransportConfig
from hfedmoe.transport.topics import check_device_id, check_id
from hfedmoe.wire import WireConfig


@dataclass(frozen=True)
class AgentConfig:
    """Everything ``hfedmoe agent`` needs.

    Attributes:
        device_id: stable identity (also the MQTT client id).
        emulate: a device profile (name or file) standing in for live measurement.
        emulate_reference: with ``emulate``, the model the profile's limits are scaled to
            (a shipped example's name such as ``"olmoe-1b-7b-0924"``, or a directory with a
            ``config.json``): the profile's memory and rates are multiplied by this model's
            parameters over the reference's (:mod:`device_agent.emulation`; the demo sets it);
            "" plans the model at its own size.
        memory_margin: share of the device's memory a budget keeps free (default 0.15,
            :data:`device_agent.budget.DEFAULT_MEMORY_MARGIN`).
        budget_cap: configured maximum experts per round (0: none); never raises the budget.
        training_memory_mib: memory training may add on top of the loaded model (an app's
            share; 0: the profile's figure, else no quota besides available memory).
        shard, num_shards: this device's part of ``data.source`` (simulation); with
            ``num_shards = 1`` the whole file is the device's data, except the bundled corpus,
            whose server-held test split never trains (:func:`device_agent.agent.local_data`).
        upload_margin_s: training stops this long before the round deadline.
        measure_seq_len: sequence length of the cost measurement (0: the model's max_length;
            re-measured when a round announces another batch size or max_length).
        runtime: ``"eager"`` (PyTorch) or ``"executorch"`` (the training program a phone runs;
            classification models, one expert set per round).
        measure_lock: a file that the agents sharing one host lock while they measure it (the
            demo and emulated fleets set it), so one agent's timings do not include another's
            work; "" measures without a lock.
        privacy: the device's own floor under the round's DP settings, its epsilon budget
            and how its loss, usage and importance leave it (:mod:`device_agent.privacy`).
    """

    device_id: str = "device-0"
    run_id: str = "hfedmoe"
    work_dir: str = ""
    emulate: str = ""
    emulate_reference: str = ""
    memory_margin: float = DEFAULT_MEMORY_MARGIN
    budget_cap: int = 0
    training_memory_mib: float = 0.0
    shard: int = 0
    num_shards: int = 1
    upload_margin_s: float = 5.0
    ack_timeout_s: float = 10.0
    measure_seq_len: int = 0
    matmul_seconds: float = 0.5
    max_rounds: int = 0
    runtime: Literal["eager", "executorch"] = "eager"
    measure_lock: str = ""
    conditions_file: str = ""  # emulated battery/charging/temperature/metered/idle (JSON)
    eligibility: EligibilityConfig = field(default_factory=EligibilityConfig)
    privacy: DevicePrivacyConfig = field(default_factory=DevicePrivacyConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    wire: WireConfig = field(default_factory=WireConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "train", resolve_adapter(self.train, self.data.task))
        check_device_id(self.device_id)  # ReservedIdError for "server" and the like
        check_id(self.run_id, "run id")
        if not 0 <= self.shard < self.num_shards:
            raise ConfigError(f"agent.shard must be in [0, num_shards={self.num_shards})")
        if self.budget_cap < 0 or self.upload_margin_s < 0 or self.ack_timeout_s <= 0:
            raise ConfigError("budget_cap and upload_margin_s must be >= 0, ack_timeout_s > 0")
        if self.training_memory_mib < 0 or self.measure_seq_len < 0:
            raise ConfigError("training_memory_mib and measure_seq_len must be >= 0")
        if not 0 <= self.memory_margin < 1:
            raise ConfigError(f"agent.memory_margin must be in [0, 1), got {self.memory_margin}")
        if self.emulate_reference and not self.emulate:
            raise ConfigError("agent.emulate_reference scales an emulated profile: set "
                              "agent.emulate too")

    @property
    def directory(self) -> Path:
        return Path(self.work_dir or f"runs/agents/{self.device_id}")


def load_agent_config(path: str | None, overrides: list[str]) -> AgentConfig:
    """``path`` (TOML; None: the defaults) with ``--set`` overrides applied."""
    return load_config(AgentConfig, path, overrides)
