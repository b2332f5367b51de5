"""Server configuration: the kit's sections plus rounds, transport and wire limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from hfedmoe.config import DataConfig, MethodConfig, ModelConfig, TrainConfig
from hfedmoe.errors import ConfigError
from hfedmoe.transport.config import TransportConfig
from hfedmoe.transport.topics import check_id
from hfedmoe.wire import WireConfig


@dataclass(frozen=True)
class RoundConfig:
    """How rounds run.

    Attributes:
        rounds: federated rounds to run.
        deadline_s: seconds a round stays open for updates (devices also train within it).
        train_time_s: local compute window each device budgets its experts for (0: the
            deadline minus the device's upload margin).
        min_updates: close the round early once this many updates are in (k of n; 0: all).
        fraction: fraction of online devices chosen each round.
        over_select: extra fraction chosen on top, so that k of n can close without stragglers.
        min_devices: devices that must be registered before the first round starts.
        registration_timeout_s: how long to wait for ``min_devices``.
        late_policy: an update that arrives after its round closed is dropped, or folded into
            the next round's aggregation.
        allowed_devices: if set, only these device ids may register.
        seed: participant sampling seed.
    """

    rounds: int = 3
    deadline_s: float = 120.0
    train_time_s: float = 0.0
    min_updates: int = 0
    fraction: float = 1.0
    over_select: float = 0.0
    min_devices: int = 1
    registration_timeout_s: float = 120.0
    late_policy: Literal["drop", "fold"] = "drop"
    allowed_devices: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError("rounds.rounds must be >= 1")
        if self.train_time_s < 0 or self.train_time_s > self.deadline_s:
            raise ConfigError("rounds.train_time_s must be in [0, deadline_s]")
        if self.deadline_s <= 0 or self.registration_timeout_s < 0:
            raise ConfigError("rounds.deadline_s must be > 0 and registration_timeout_s >= 0")
        if self.min_updates < 0 or self.min_devices < 1:
            raise ConfigError("rounds.min_updates must be >= 0 and min_devices >= 1")
        if not 0 < self.fraction <= 1 or self.over_select < 0:
            raise ConfigError("rounds.fraction must be in (0, 1] and over_select >= 0")
        for d in self.allowed_devices:
            check_id(d, "device id")


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``hfedmoe server`` needs."""

    run_id: str = "hfedmoe"
    run_dir: str = "runs/hfedmoe"
    eval_batch_size: int = 32
    max_eval_examples: int = 0  # 0: the whole held-out split
    prometheus_port: int = 0  # 0: no endpoint
    max_register_bytes: int = 1 << 20
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rounds: RoundConfig = field(default_factory=RoundConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    wire: WireConfig = field(default_factory=WireConfig)

    def __post_init__(self) -> None:
        check_id(self.run_id, "run id")
        if self.eval_batch_size < 1 or self.max_eval_examples < 0:
            raise ConfigError("eval_batch_size must be >= 1 and max_eval_examples >= 0")
