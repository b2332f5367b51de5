"""When to re-measure the budget: memory pressure, thermal throttling, drifting step times.

METHOD.md section 4 says the budget is re-measured when conditions change. The
:class:`BudgetMonitor` is pure logic: the agent feeds it :class:`Observation` values (from a
fresh device report and its own step timings) and gets back whether to re-measure, why, and a
provisional budget re-derived from the observation until the new measurement is in:

- available memory below ``(1 - memory_drop_fraction)`` of what the budget planned with:
  the budget is recomputed with the observed memory;
- thermal throttling entered (CPU clock below ``min_freq_ratio`` of its maximum, the policy
  maximum capped, or a temperature at or above ``max_temperature_c``): times are scaled by
  1 / clock ratio when the ratio is known, and back to the measured times when it ends;
- the measured step time off the prediction by more than ``step_drift_fraction``: every time
  in the cost model is scaled by measured / predicted.

Time scaling is always applied to the last *measured* cost model, so repeated observations do
not compound.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from device_agent.budget import Budget, compute_budget
from hfedmoe.errors import DeviceError


@dataclass(frozen=True)
class MonitorConfig:
    """Thresholds of the re-measure triggers."""

    memory_drop_fraction: float = 0.15
    min_freq_ratio: float = 0.75
    max_temperature_c: float = 80.0
    step_drift_fraction: float = 0.25

    def __post_init__(self) -> None:
        if not (0 < self.memory_drop_fraction < 1 and 0 < self.min_freq_ratio <= 1
                and self.step_drift_fraction > 0):
            raise DeviceError("monitor thresholds: memory_drop_fraction in (0, 1), "
                              "min_freq_ratio in (0, 1], step_drift_fraction > 0")


@dataclass(frozen=True)
class Observation:
    """What the agent saw since the last check; None means "not observed".

    Attributes:
        available_bytes: memory the device can give now.
        cpufreq_ratio: current / maximum CPU clock while training.
        temperature_c: hottest thermal zone.
        throttled: the CPU policy maximum is capped below the hardware maximum.
        step_seconds: mean measured step time.
        trained_experts: experts trained in those steps (default: the budget's count).
    """

    available_bytes: int | None = None
    cpufreq_ratio: float | None = None
    temperature_c: float | None = None
    throttled: bool | None = None
    step_seconds: float | None = None
    trained_experts: int | None = None


@dataclass(frozen=True)
class MonitorDecision:
    """The monitor's answer: re-measure or not, why, and the budget to use meanwhile."""

    remeasure: bool
    reasons: tuple[str, ...]
    budget: Budget


class BudgetMonitor:
    """Watches observations against the current budget's assumptions.

    Args:
        budget: the budget derived from the last measurement.
        config: trigger thresholds.
    """

    def __init__(self, budget: Budget, config: MonitorConfig | None = None) -> None:
        self.config = config or MonitorConfig()
        self.reset(budget)

    def reset(self, budget: Budget) -> None:
        """Start over from a freshly measured budget."""
        self.budget = budget
        self._measured = budget.cost
        self._time_factor = 1.0
        self._throttled = False

    def _thermal(self, obs: Observation) -> list[str]:
        cfg, out = self.config, []
        if obs.cpufreq_ratio is not None and obs.cpufreq_ratio < cfg.min_freq_ratio:
            out.append(f"thermal: CPU clock at {obs.cpufreq_ratio:.0%} of maximum "
                       f"(< {cfg.min_freq_ratio:.0%})")
        if obs.throttled:
            out.append("thermal: CPU frequency policy capped below the hardware maximum")
        if obs.temperature_c is not None and obs.temperature_c >= cfg.max_temperature_c:
            out.append(f"thermal: {obs.temperature_c:.1f} C >= {cfg.max_temperature_c:.1f} C")
        return out

    def _throttled_now(self, obs: Observation) -> bool:
        seen = any(v is not None for v in (obs.cpufreq_ratio, obs.temperature_c, obs.throttled))
        return bool(self._thermal(obs)) if seen else self._throttled

    def check(self, obs: Observation) -> tuple[str, ...]:
        """The reasons to re-measure given ``obs`` (empty: none). Does not change state."""
        cfg, budget, reasons = self.config, self.budget, []
        planned = budget.limits.available_bytes
        if obs.available_bytes is not None and \
                obs.available_bytes < planned * (1 - cfg.memory_drop_fraction):
            reasons.append(f"memory: available {obs.available_bytes} B is more than "
                           f"{cfg.memory_drop_fraction:.0%} below the planned {planned} B")
        thermal = self._thermal(obs)
        if thermal and not self._throttled:
            reasons.extend(thermal)
        elif self._throttled and not self._throttled_now(obs):
            reasons.append("thermal: throttling ended")
        if obs.step_seconds is not None:
            c = budget.c_budget if obs.trained_experts is None else obs.trained_experts
            predicted = budget.cost.step_seconds(c)
            if predicted > 0 and abs(obs.step_seconds - predicted) / predicted > \
                    cfg.step_drift_fraction:
                reasons.append(f"drift: measured step {obs.step_seconds:.4g} s vs predicted "
                               f"{predicted:.4g} s (> {cfg.step_drift_fraction:.0%})")
        return tuple(reasons)

    def observe(self, obs: Observation) -> MonitorDecision:
        """Check ``obs``; on a trigger, re-derive the budget from it and make that current.

        Returns:
            The decision; its budget is the current one when nothing triggered.
        """
        reasons = self.check(obs)
        throttled_now = self._throttled_now(obs)
        if not reasons:
            self._throttled = throttled_now
            return MonitorDecision(False, (), self.budget)
        factor = self._time_factor
        if obs.step_seconds is not None and any(r.startswith("drift") for r in reasons):
            c = self.budget.c_budget if obs.trained_experts is None else obs.trained_experts
            factor = obs.step_seconds / self._measured.step_seconds(c)
        elif throttled_now and not self._throttled and obs.cpufreq_ratio:
            factor = max(factor, 1.0 / obs.cpufreq_ratio)
        elif self._throttled and not throttled_now:
            factor = 1.0
        self._time_factor = factor
        self._throttled = throttled_now
        limits = self.budget.limits
        if obs.available_bytes is not None:
            limits = dataclasses.replace(limits, available_bytes=obs.available_bytes)
        cost = self._measured if factor == 1.0 else self._measured.scaled_time(factor)
        self.budget = compute_budget(cost, limits)
        return MonitorDecision(True, reasons, self.budget)
