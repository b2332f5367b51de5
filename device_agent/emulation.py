"""Emulation at a scale: a small model standing in for a real one on a profiled device.

A device profile describes the device (:mod:`device_agent.profiles`), so it gives a real model
its real budget. The demo and the simulator train a small model (the 22 M-parameter MiniLM-MoE)
in place of a real one; on a 2 GiB phone that model would fit many times over and no budget
would bind. An :class:`EmulationScale` makes the stand-in explicit: the device's memory,
memory bandwidth and matmul rates are multiplied by ``factor = the model's parameters / a
named reference model's`` (OLMoE-1B-7B by default), so the small model meets the limits a
model of the reference's size would meet, in the same proportions across devices.

Under a scale the host process holds the stand-in model, its non-expert part and its frozen
experts' saved inputs; the scaled memory (after the safety margin) is what the trained
experts' gradients, optimizer state, starting copies and saved activations may take. Times are
the stand-in's counted FLOPs and bytes at the scaled rates (:mod:`device_agent.work`): no
timing of the host enters, so two plannings give the same budgets. The scale is printed by the
demo and stored with the run: in each device's report (``emulation``) and budget.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from device_agent.budget import (
    DEFAULT_MEMORY_MARGIN,
    Budget,
    CostModel,
    Limits,
    compute_budget,
)
from hfedmoe.errors import ConfigError

if TYPE_CHECKING:
    from device_agent.report import DeviceReport
    from device_agent.work import PlannedMode

# The shipped examples (examples/models/NAME/config.json), parameters counted by
# hfedmoe.models.plan.plan_model (tests/device_agent/test_emulation.py recounts them).
REFERENCE_MODELS: dict[str, tuple[str, int]] = {
    "olmoe-1b-7b-0924": ("OLMoE-1B-7B-0924", 6_919_161_856),
    "qwen1.5-moe-a2.7b": ("Qwen1.5-MoE-A2.7B", 14_315_784_192),
    "deepseek-v2-lite": ("DeepSeek-V2-Lite", 15_706_484_224),
    "gpt-oss-20b": ("gpt-oss-20b", 20_914_757_184),
    "deepseek-moe-16b": ("DeepSeekMoE-16B", 16_375_728_128),
    "switch-base-64": ("Switch-base-64", 3_790_748_928),
}
DEFAULT_REFERENCE = "olmoe-1b-7b-0924"


@dataclass(frozen=True)
class EmulationScale:
    """``factor = model_params / reference_params``: what a profile's memory, bandwidth and
    rates are multiplied by when ``model`` stands in for ``reference``."""

    model: str
    model_params: int
    reference: str
    reference_params: int
    source: str  # where the reference's parameter count comes from

    @property
    def factor(self) -> float:
        return self.model_params / self.reference_params

    def describe(self) -> str:
        return (f"{self.model} ({self.model_params / 1e6:.1f} M parameters) / {self.reference} "
                f"({self.reference_params / 1e9:.2f} B) = {self.factor:.4g}")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "factor": self.factor}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EmulationScale:
        return cls(**{k: v for k, v in data.items() if k != "factor"})


def reference_model(reference: str, field: str) -> tuple[str, int, str]:
    """``(name, parameters, source)`` of a shipped example's name or a directory holding a
    ``config.json`` (its parameters counted on the meta device).

    Raises:
        ConfigError: naming ``field`` when it is neither.
    """
    if reference in REFERENCE_MODELS:
        name, params = REFERENCE_MODELS[reference]
        return name, params, (f"examples/models/{reference}/config.json, parameters counted "
                              f"by hfedmoe.models.plan.plan_model")
    path = Path(reference)
    if (path / "config.json").is_file():
        from hfedmoe.models.plan import build_meta_model, plan_model

        params = int(plan_model(build_meta_model(path))["total_params"])
        return path.name, params, f"{path / 'config.json'}, parameters counted on the meta device"
    raise ConfigError(f"{field} = {reference!r}: not a model directory with a config.json and "
                      f"not one of {sorted(REFERENCE_MODELS)}")


def emulation_scale(model: str, model_params: int, reference: str,
                    field: str = "emulate_reference") -> EmulationScale | None:
    """The scale at which ``model`` stands in for ``reference`` ("": no scale, None).

    Raises:
        ConfigError: naming ``field`` for an unknown reference or one not larger than
            the model.
    """
    if not reference:
        return None
    name, params, source = reference_model(reference, field)
    if model_params <= 0 or model_params >= params:
        raise ConfigError(f"{field} = {reference!r}: the reference ({params:,} parameters) must "
                          f"be larger than the model it scales ({model_params:,})")
    return EmulationScale(model, model_params, name, params, source)


def scaled_report(report: DeviceReport, scale: EmulationScale) -> DeviceReport:
    """``report`` with its memory, bandwidth and matmul rates multiplied by the scale."""
    f = scale.factor

    def times(value: Any) -> Any:
        return None if value is None else type(value)(value * f)

    matmul = {k: dataclasses.replace(m, gflops=m.gflops * f) for k, m in report.matmul.items()}
    peaks = {p: {d: r * f for d, r in rates.items()} for p, rates in report.peak_gflops.items()}
    return dataclasses.replace(
        report, memory_total_bytes=times(report.memory_total_bytes),
        memory_available_bytes=times(report.memory_available_bytes),
        app_memory_limit_bytes=times(report.app_memory_limit_bytes),
        gpu_memory_total_bytes=times(report.gpu_memory_total_bytes),
        gpu_memory_free_bytes=times(report.gpu_memory_free_bytes),
        memory_bandwidth_gbps=times(report.memory_bandwidth_gbps), matmul=matmul,
        peak_gflops=peaks, emulation=scale.to_dict(),
        notes=(*report.notes, f"emulation scale {scale.describe()}: memory, bandwidth and "
                              f"rates multiplied by it"))


def window_problem(budget: Budget, window_field: str) -> str | None:
    """Why the budget's window cannot hold one step (None when it can)."""
    if budget.steps >= 1:
        return None
    return (f"{window_field} = {budget.limits.deadline_seconds:g} s is shorter than one step: "
            f"{budget.step_seconds:.3g} s with {budget.c_budget} expert(s) trained"
            + (f" (routing pass {budget.limits.routing_batches} x "
               f"{budget.cost.routing_seconds:.3g} s)" if budget.limits.routing_batches else ""))


def _host_pool(cost: CostModel, device: DeviceReport, *, scaled: bool, margin: float
               ) -> tuple[CostModel, dict[str, Any]]:
    """A discrete GPU's host pool as planned: the model's weights pass through host memory
    as it loads (its base), and each trained expert's update is encoded there
    (:func:`device_agent.budget.update_host_bytes`); against the profile's available host
    memory (``cost.host_per_expert_bytes`` is counted by :mod:`device_agent.work`). Nothing
    for one pool (CPU, unified memory). The interpreter and libraries are not
    counted: the margin covers them, a live device measures them (its RSS)."""
    if not device.discrete_gpu or device.host_memory_bytes is None:
        return cost, {}
    weights = cost.non_expert_weight_bytes + cost.num_experts * cost.expert_weight_bytes
    cost = dataclasses.replace(cost, host_resident_bytes=weights)
    host = int(device.host_memory_bytes)
    if not scaled:
        return cost, {"host_available_bytes": host}
    # as the GPU pool under a scale: the host holds the stand-in; the scaled memory the rest
    return cost, {"host_available_bytes": weights + host, "host_margin_bytes": int(host * margin)}


def planned_budget(planned: PlannedMode, report: DeviceReport, *, window_s: float,
                   steps: int, scale: EmulationScale | None = None,
                   margin: float = DEFAULT_MEMORY_MARGIN, cap: int | None = None,
                   routing_batches: int = 0, min_experts: int = 1,
                   quota_bytes: int | None = None, dtype_field: str = "train.dtype",
                   window_field: str | None = None) -> Budget:
    """The budget of ``planned`` on the profiled device ``report``, from its rates: the same
    inputs give the same budget on any host.

    Without a scale the model is planned at its own size: its weights, activations and training
    state against the device's memory less the margin. With one, the device is scaled
    (:func:`scaled_report`) and its memory after the margin bounds what the trained experts
    add (the module doc says why).

    Raises:
        ConfigError: naming ``dtype_field`` when the device has no rate for the mode's dtype,
            and naming ``window_field`` (when given) when the window cannot hold one step.
    """
    device = scaled_report(report, scale) if scale is not None else report
    cost = planned.cost_on(device, dtype_field)
    available = device.budget_memory_bytes
    if available is None:
        raise ConfigError(f"device {report.source!r} has no available-memory figure")
    if not window_s > 0:
        raise ConfigError(f"{window_field or 'the window'} must be > 0 seconds, got {window_s}")
    common: dict[str, Any] = {"deadline_seconds": window_s,
                              "steps_per_round": max(1, steps), "cap": cap,
                              "training_quota_bytes": quota_bytes or None,
                              "routing_batches": routing_batches, "min_experts": min_experts}
    cost, host = _host_pool(cost, device, scaled=scale is not None, margin=margin)
    common.update(host)
    if scale is None:
        limits = Limits(available_bytes=int(available), margin_fraction=margin, **common)
    else:  # the host holds the stand-in's base; the scaled memory holds the trained experts
        limits = Limits(available_bytes=cost.base_bytes + int(available), margin_fraction=0.0,
                        margin_bytes=int(available * margin), **common)
    budget = compute_budget(cost, limits)
    if scale is not None:
        budget = dataclasses.replace(budget, emulation=scale.to_dict(), reason=(
            f"{budget.reason}; emulated memory {available / 2**20:.1f} MiB "
            f"({report.budget_memory_bytes / 2**30:.1f} GiB x {scale.factor:.4g}) less "
            f"{margin:.0%} margin for the trained experts, {cost.per_trained_expert_bytes / 2**20:.2f}"
            f" MiB each"))
    problem = window_problem(budget, window_field) if window_field else None
    if problem:
        raise ConfigError(f"device {report.source!r}: {problem}")
    return budget
