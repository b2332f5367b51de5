"""What this device can train in a round: the host it runs on (measured, or an emulated profile),
its model's measured step costs, and the expert budget it decides from them
(:func:`device_agent.costs.measure_costs`, :func:`device_agent.costs.decide_budget`).

An emulated device plans from its profile instead (:func:`device_agent.emulation.planned_budget`):
the model's counted memory and work at the profile's rates for the dtype it trains in, scaled
by ``agent.emulate_reference``'s emulation scale when one is set. No timing of the host enters,
so an emulated device decides the same budget in every run.

The costs are re-measured when a round announces another shape (batch size, max_length,
adapter, LoRA rank) and when the device itself changed after a round (memory pressure,
throttling, drifting step times: :class:`device_agent.monitor.BudgetMonitor`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from device_agent.monitor import BudgetMonitor, Observation
from hfedmoe.config import TrainConfig

if TYPE_CHECKING:
    from device_agent.config import AgentConfig
    from device_agent.report import DeviceReport
    from hfedmoe.models.base import MoEModel

log = logging.getLogger("hfedmoe.agent")

# The window of the first budget, before a round announces its own (field trials have minutes).
START_WINDOW_S = 600.0


@contextlib.contextmanager
def host_lock(path: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the block; "" holds none.

    Agents that share one host (the demo's emulated devices) take it while they time the host,
    one at a time, so no agent's step costs include another's measurement."""
    if not path:
        yield
        return
    import fcntl

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def probe_host(cfg: AgentConfig) -> tuple[DeviceReport, DeviceReport]:
    """``(host, report)``: this machine's probes, and the device the budget is decided for
    (the emulated profile, else the host). Taken before the model loads; an emulated device
    times the host's matmuls later, next to its step costs."""
    from device_agent.profiles import load_profile
    from device_agent.resources import probe_device

    host = probe_device(matmul_seconds=0 if cfg.emulate else cfg.matmul_seconds)
    return host, (load_profile(cfg.emulate) if cfg.emulate else host)


def quantize_base(model: MoEModel, cfg: AgentConfig) -> None:
    """Store the model's frozen base quantized (``model.quantize``; a no-op for "none" and
    for weights already quantized). Training over it needs ``train.adapter = "lora"``:
    :func:`device_agent.train.train_round` refuses a round announced otherwise."""
    from hfedmoe.models.quantize import quantize_model

    report = quantize_model(model, cfg.model.quantize)
    if report.experts or report.linears:
        log.info("%s: base stored %s: %d expert weights, %d linears, %.1f -> %.1f MB",
                 cfg.device_id, report.mode, report.experts, report.linears,
                 report.bytes_before / 1e6, report.bytes_after / 1e6)


class Capacity:
    """The device's host and report, its model's step costs, and its expert budget.

    Attributes:
        host: this machine's measurements (an emulated device's times are scaled from them).
        report: the device the budget is for (an emulated profile, else ``host``).
        costs: the last :func:`device_agent.costs.measure_costs` result (None before
            :meth:`start`).
        budget: the last decided :class:`device_agent.budget.Budget`.
        train: the recipe of the last round (the server's settings over the device's).
    """

    def __init__(self, cfg: AgentConfig, model: MoEModel, num_examples: int,
                 host: DeviceReport, report: DeviceReport, scale: Any = None) -> None:
        self.cfg = cfg
        self.scale = scale  # device_agent.emulation.EmulationScale of an emulated device
        self.model = model
        self.num_examples = num_examples
        self.host = host
        self.report = report
        self.train: TrainConfig = cfg.train
        self.costs: Any = None
        self.budget: Any = None
        self.monitor: BudgetMonitor | None = None
        self._planned: dict[tuple, Any] = {}  # emulated devices: counted modes by shape

    def start(self) -> None:
        """Measure at the configured shape and decide a first budget (a 10-minute round)."""
        cfg = self.cfg
        self.costs = self.measure(cfg.train.batch_size, cfg.measure_seq_len or cfg.model.max_length)
        self.budget = self.decide(deadline_s=START_WINDOW_S, train=cfg.train)
        self.monitor = BudgetMonitor(self.budget)

    def measure(self, batch_size: int, seq_len: int, train: TrainConfig | None = None) -> Any:
        """The model's step costs at ``batch_size`` x ``seq_len``, timed under the host lock."""
        from device_agent.costs import measure_costs
        from hfedmoe.lora import LoRASpec

        cfg = self.cfg
        train = train or cfg.train
        with host_lock(cfg.measure_lock):
            log.info("%s: measuring step costs at batch %d x %d (%s experts)",
                     cfg.device_id, batch_size, seq_len, train.adapter)
            if cfg.emulate and cfg.matmul_seconds > 0:
                # the emulated device's times are the host's scaled by matmul throughput:
                # both taken under the same conditions, one right after the other
                from device_agent.resources import measure_throughput

                self.host = dataclasses.replace(self.host, matmul=measure_throughput(
                    next(self.model.module.parameters()).device, cfg.matmul_seconds))
            return measure_costs(self.model, batch_size, seq_len, train.optimizer,
                                 train.detach_frozen, adapter=train.adapter,
                                 lora=LoRASpec(train.lora_rank, train.lora_alpha),
                                 unified_memory=self.report.unified_memory)

    def decide(self, deadline_s: float, train: TrainConfig) -> Any:
        """The budget for a round of ``deadline_s`` seconds of training with ``train``."""
        from device_agent.costs import decide_budget, steps_per_round

        steps = steps_per_round(self.num_examples, train.batch_size, train.local_epochs,
                                train.max_steps)
        quota = int(self.cfg.training_memory_mib * 2**20) or None
        kw: dict[str, Any] = {"cap": self.cfg.budget_cap or None, "min_experts": train.min_experts,
                              "routing_batches": min(train.selection_batches or steps, steps)}
        if self.report.emulated:
            budget = self._planned_budget(max(deadline_s, 1e-3), steps, train, quota, kw)
        else:
            budget = decide_budget(self.report, self.costs.cost, max(deadline_s, 1e-3), steps,
                                   host=self.host, quota_bytes=quota,
                                   margin_fraction=self.cfg.memory_margin, **kw)
        if budget.steps < 1:
            log.warning("%s: a %.0f s window holds no step: %.3g s with %d expert(s)",
                        self.cfg.device_id, deadline_s, budget.step_seconds, budget.c_budget)
        return budget

    def _planned_budget(self, window_s: float, steps: int, train: TrainConfig,
                        quota: int | None, kw: dict[str, Any]) -> Any:
        """An emulated device's budget: the model counted at the round's shape (once per
        shape), planned at the profile's rates (:func:`device_agent.emulation.planned_budget`)."""
        from device_agent.emulation import planned_budget
        from device_agent.work import base_for, planned_mode

        base = base_for(self.cfg.model.quantize, train.dtype)
        dtype = "bfloat16" if base == "int4" else train.dtype  # int4's kernel runs on bf16
        key = (self.costs.batch_size, self.costs.seq_len, train.adapter, base, dtype,
               train.lora_rank, train.optimizer)
        if key not in self._planned:
            self._planned[key] = planned_mode(self.model, train.adapter, base, key[0], key[1],
                                              train.optimizer, train.lora_rank, dtype)
        return planned_budget(self._planned[key], self.report, window_s=window_s, steps=steps,
                              scale=self.scale, margin=self.cfg.memory_margin, quota_bytes=quota,
                              **kw)

    def fit_round(self, train: TrainConfig, max_length: int) -> None:
        """Take a round's recipe; re-measure when it announces another shape or adapter."""
        self.train = train
        costs = self.costs
        if ((costs.batch_size, costs.seq_len, costs.adapter)
                != (train.batch_size, max_length, train.adapter)
                or (train.adapter == "lora" and costs.lora_rank != train.lora_rank)):
            self.costs = self.measure(train.batch_size, max_length, train)

    def rebudget(self, window_s: float, train: TrainConfig) -> bool:
        """Decide the budget for a training window; whether it changed (the server must hear
        of a new budget)."""
        before = self.budget.c_budget
        self.budget = self.decide(window_s, train)
        return self.budget.c_budget != before

    def watch(self, result: Any) -> None:
        """Re-measure when the device changed: memory pressure, throttling, drifting steps."""
        if self.report.emulated:  # host timings say nothing about the emulated device
            return
        from device_agent.resources import probe_device

        live = probe_device(matmul_seconds=0)
        assert self.monitor is not None  # set by start()
        self.monitor.reset(self.budget)
        decision = self.monitor.observe(Observation(
            available_bytes=live.budget_memory_bytes, cpufreq_ratio=live.cpufreq_ratio,
            temperature_c=live.temperature_c, throttled=live.throttled,
            step_seconds=result.seconds / result.steps,
            trained_experts=len(result.selected)))
        if decision.remeasure:
            log.info("%s: re-measuring: %s", self.cfg.device_id, "; ".join(decision.reasons))
            self.report = self.host = probe_device(matmul_seconds=self.cfg.matmul_seconds)
            self.costs = self.measure(self.costs.batch_size, self.costs.seq_len, self.train)
