"""Decide C_budget: the largest number of experts a device can train per round.

METHOD.md section 4: C_budget(c) is the largest number of experts whose training fits

- memory:  weights in use + C x (grads + optimizer state + saved activations of one trained
  expert) + (E - C) x saved activations of one frozen expert (exact path: its pre-activation,
  for the input gradient) + the non-expert part's activations and training state + a safety
  margin <= the memory the device can give, and
- time:    steps_per_round x step_seconds(C) <= the round deadline, with
  step_seconds(C) = routing pre-pass + rest + (E - C) x frozen expert + C x trained expert,
  where E is the number of experts in the pool (every expert receives tokens each step, true
  when batch x seq_len x top_k is well above the experts per layer), a trained expert's time
  is its forward + backward + optimizer step, and the routing pre-pass is the forward without
  autograd that ``train_round`` runs before every step to select experts.

A configured cap may lower the budget, never raise it past what was measured. Everything here
is pure: no clock, no file, no probe. :class:`BudgetMonitor` takes observations from the agent
and says when to re-measure.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from hfedmoe.errors import DeviceError

if TYPE_CHECKING:
    from device_agent.report import DeviceReport

Limit = Literal["memory", "time", "cap", "all-experts"]
_REL_TOL = 1e-9  # float slack when a predicted round time equals the deadline


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise DeviceError(msg)


def optimizer_state_bytes(num_params: int, optimizer: str, *, momentum: bool = False,
                          state_dtype_bytes: int = 4) -> int:
    """Optimizer state of ``num_params`` parameters: AdamW 2 moments, SGD 0 or 1 (momentum)."""
    moments = {"adamw": 2, "sgd": 1 if momentum else 0}.get(optimizer)
    _require(moments is not None, f"unknown optimizer {optimizer!r}; known: adamw, sgd")
    return num_params * moments * state_dtype_bytes


def expert_state_bytes(num_params: int, optimizer: str, *, param_dtype_bytes: int = 4,
                       momentum: bool = False, state_dtype_bytes: int = 4) -> int:
    """Gradients plus optimizer state of one trained expert with ``num_params`` parameters."""
    return num_params * param_dtype_bytes + optimizer_state_bytes(
        num_params, optimizer, momentum=momentum, state_dtype_bytes=state_dtype_bytes)


def tokens_per_expert(batch_size: int, seq_len: int, top_k: int, experts_per_layer: int) -> int:
    """An expert's share of a layer's routed tokens under balanced routing (rounded up)."""
    _require(min(batch_size, seq_len, top_k, experts_per_layer) >= 1, "sizes must be >= 1")
    return math.ceil(batch_size * seq_len * top_k / experts_per_layer)


def expert_activation_bytes(tokens: int, hidden_size: int, ffn_size: int, *,
                            dtype_bytes: int = 4, gated: bool = True) -> int:
    """Activations one trained MLP expert saves for backward.

    Per token: the input (``hidden_size``), the up projection and, for a gated (SwiGLU) expert,
    the gate projection (``ffn_size`` each), and the activation output (``ffn_size``). An
    estimate; the measured peak of :func:`device_agent.throughput.measure_step_costs` is better.
    """
    per_token = hidden_size + (3 if gated else 2) * ffn_size
    return tokens * per_token * dtype_bytes


@dataclass(frozen=True)
class CostModel:
    """Memory (bytes) and time (seconds per step) of one local training step.

    Attributes:
        num_experts: experts in the pool, over all MoE layers.
        non_expert_weight_bytes: weights of everything that is not an expert.
        expert_weight_bytes: weights of one expert (all experts stay loaded).
        expert_state_bytes: grads + optimizer state of one trained expert.
        expert_activation_bytes: activations one trained expert saves for backward.
        non_expert_activation_bytes: the non-expert part's peak activations, plus the grads and
            optimizer state of trainable non-expert parameters (gates, head) and the transient
            working set of frozen experts.
        expert_frozen_activation_bytes: activations one *frozen* expert saves for backward in
            the exact path (its pre-activation, for the gradient to its input); 0 with
            ``detach_frozen``. A trained expert saves this too, inside
            ``expert_activation_bytes``.
        expert_grad_bytes: the gradient part of ``expert_state_bytes`` (0: not split). When
            given, a trained expert adds ``max(gradient, activations)`` rather than their sum:
            backward frees an expert's saved activations as it writes its gradients, so the two
            never peak together (measured: ``benchmarks/budget.py``).
        rest_step_seconds: forward+backward (+ optimizer step of gates and head) of the
            non-expert part.
        expert_frozen_seconds: one frozen expert's share of a step: forward, plus the backward
            to its input unless frozen experts are detached.
        expert_trained_seconds: forward+backward+optimizer step of one trained expert.
        routing_seconds: the routing pre-pass, a forward of the whole model without autograd
            run before every training step (0: not measured).
    """

    num_experts: int
    non_expert_weight_bytes: int
    expert_weight_bytes: int
    expert_state_bytes: int
    expert_activation_bytes: int
    non_expert_activation_bytes: int = 0
    rest_step_seconds: float = 0.0
    expert_frozen_seconds: float = 0.0
    expert_trained_seconds: float = 0.0
    routing_seconds: float = 0.0
    expert_frozen_activation_bytes: int = 0
    expert_grad_bytes: int = 0

    def __post_init__(self) -> None:
        _require(self.num_experts >= 1, "num_experts must be >= 1")
        for f in dataclasses.fields(self):
            _require(getattr(self, f.name) >= 0, f"{f.name} must be >= 0")
        _require(self.expert_trained_seconds >= self.expert_frozen_seconds,
                 "expert_trained_seconds must be >= expert_frozen_seconds")
        _require(self.expert_activation_bytes >= self.expert_frozen_activation_bytes,
                 "expert_activation_bytes must be >= expert_frozen_activation_bytes")
        _require(self.expert_grad_bytes <= self.expert_state_bytes,
                 "expert_grad_bytes must be <= expert_state_bytes")

    @property
    def base_bytes(self) -> int:
        """Memory with no expert trained: all weights, what every expert saves when frozen,
        and the non-expert part's needs."""
        return (self.non_expert_weight_bytes + self.num_experts * self.expert_weight_bytes
                + self.num_experts * self.expert_frozen_activation_bytes
                + self.non_expert_activation_bytes)

    @property
    def per_trained_expert_bytes(self) -> int:
        """What training one more expert adds (beyond what it saved while frozen)."""
        grad = self.expert_grad_bytes
        held = (self.expert_state_bytes - grad + max(grad, self.expert_activation_bytes)
                if grad else self.expert_state_bytes + self.expert_activation_bytes)
        return held - self.expert_frozen_activation_bytes

    def peak_bytes(self, c: int) -> int:
        """Predicted peak memory with ``c`` experts trained."""
        return self.base_bytes + c * self.per_trained_expert_bytes

    def step_seconds(self, c: int) -> float:
        """Predicted time of one step with ``c`` of the ``num_experts`` experts trained."""
        return (self.routing_seconds + self.rest_step_seconds
                + (self.num_experts - c) * self.expert_frozen_seconds
                + c * self.expert_trained_seconds)

    def scaled_time(self, factor: float) -> CostModel:
        """The same model with every time multiplied by ``factor`` (throttling, emulation)."""
        _require(factor > 0, "time factor must be > 0")
        return dataclasses.replace(
            self, rest_step_seconds=self.rest_step_seconds * factor,
            expert_frozen_seconds=self.expert_frozen_seconds * factor,
            expert_trained_seconds=self.expert_trained_seconds * factor,
            routing_seconds=self.routing_seconds * factor)


@dataclass(frozen=True)
class Limits:
    """What the device can give and what the server asks.

    Attributes:
        available_bytes: memory the device can give the training process.
        deadline_seconds: the server's round deadline for local training.
        steps_per_round: local steps in a round.
        margin_fraction: share of ``available_bytes`` kept free.
        margin_bytes: fixed bytes kept free, on top of the fraction.
        cap: configured maximum number of trained experts (None: no cap).
    """

    available_bytes: int
    deadline_seconds: float
    steps_per_round: int
    margin_fraction: float = 0.1
    margin_bytes: int = 0
    cap: int | None = None

    def __post_init__(self) -> None:
        _require(self.available_bytes >= 0, "available_bytes must be >= 0")
        _require(self.deadline_seconds > 0, "deadline_seconds must be > 0")
        _require(self.steps_per_round >= 1, "steps_per_round must be >= 1")
        _require(0.0 <= self.margin_fraction < 1.0, "margin_fraction must be in [0, 1)")
        _require(self.margin_bytes >= 0, "margin_bytes must be >= 0")
        _require(self.cap is None or self.cap >= 0, "cap must be >= 0 or None")

    @property
    def margin(self) -> int:
        return int(self.available_bytes * self.margin_fraction) + self.margin_bytes

    @property
    def usable_bytes(self) -> int:
        return self.available_bytes - self.margin


@dataclass(frozen=True)
class Budget:
    """The decided budget with the predictions and inputs behind it (logged and sent).

    ``memory_max`` / ``time_max`` are the largest counts each constraint allows on its own
    (capped at ``num_experts``), -1 when even no trained expert fits.
    """

    c_budget: int
    limit: Limit
    reason: str
    step_seconds: float
    round_seconds: float
    peak_bytes: int
    memory_max: int
    time_max: int
    cost: CostModel
    limits: Limits

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Budget:
        try:
            return cls(**{**data, "cost": CostModel(**data["cost"]),
                          "limits": Limits(**data["limits"])})
        except (TypeError, KeyError) as exc:
            raise DeviceError(f"malformed budget: {exc}") from exc


def memory_max_experts(cost: CostModel, limits: Limits) -> int:
    """Largest trained-expert count that fits in memory; -1 if the base does not fit."""
    free = limits.usable_bytes - cost.base_bytes
    if free < 0:
        return -1
    per = cost.per_trained_expert_bytes
    return cost.num_experts if per == 0 else min(cost.num_experts, free // per)


def _round_fits(cost: CostModel, limits: Limits, c: int) -> bool:
    round_s = limits.steps_per_round * cost.step_seconds(c)
    return round_s <= limits.deadline_seconds * (1 + _REL_TOL)


def time_max_experts(cost: CostModel, limits: Limits) -> int:
    """Largest trained-expert count whose round fits the deadline; -1 if none does."""
    if not _round_fits(cost, limits, 0):
        return -1
    extra = cost.expert_trained_seconds - cost.expert_frozen_seconds
    if extra == 0:
        return cost.num_experts
    per_step = limits.deadline_seconds / limits.steps_per_round
    estimate = (per_step - cost.step_seconds(0)) / extra  # may overflow to inf for tiny extra
    c = cost.num_experts if estimate >= cost.num_experts else int(estimate)
    while c > 0 and not _round_fits(cost, limits, c):
        c -= 1
    while c < cost.num_experts and _round_fits(cost, limits, c + 1):
        c += 1
    return c


def compute_budget(cost: CostModel, limits: Limits) -> Budget:
    """C_budget: the most experts whose training fits memory and the round deadline.

    Args:
        cost: measured or estimated costs of the model on this device.
        limits: available memory, margin, deadline, steps per round and an optional cap.

    Returns:
        The budget, the constraint that set it and the predicted step time and peak memory.
    """
    mem_c, time_c = memory_max_experts(cost, limits), time_max_experts(cost, limits)
    if mem_c < 0 or time_c < 0:
        why = []
        if mem_c < 0:
            why.append(f"memory: the non-expert part and weights need {cost.base_bytes} B, "
                       f"{limits.usable_bytes} B usable after the margin")
        if time_c < 0:
            why.append(f"time: {limits.steps_per_round} steps x {cost.step_seconds(0):.4g} s "
                       f"with no expert trained exceed the {limits.deadline_seconds:g} s deadline")
        c, limit, reason = 0, ("memory" if mem_c < 0 else "time"), "nothing fits; " + "; ".join(why)
    else:
        c = min(mem_c, time_c)
        if c == cost.num_experts:
            limit, reason = "all-experts", f"all {c} experts fit memory and deadline"
        elif mem_c <= time_c:
            limit, reason = "memory", f"memory allows {mem_c} trained experts (time {time_c})"
        else:
            limit, reason = "time", f"deadline allows {time_c} trained experts (memory {mem_c})"
        if limits.cap is not None and limits.cap < c:
            limit, reason = "cap", f"configured cap {limits.cap} below measured {c} ({reason})"
            c = limits.cap
        elif limits.cap is not None and limits.cap > c:
            reason += f"; configured cap {limits.cap} is above what was measured, ignored"
    step = cost.step_seconds(c)
    return Budget(c_budget=c, limit=limit, reason=reason, step_seconds=step,
                  round_seconds=step * limits.steps_per_round, peak_bytes=cost.peak_bytes(c),
                  memory_max=mem_c, time_max=time_c, cost=cost, limits=limits)


def budget_from_report(report: DeviceReport, cost: CostModel, deadline_seconds: float,
                       steps_per_round: int, **limits: Any) -> Budget:
    """:func:`compute_budget` with the available memory taken from a device report.

    Raises:
        DeviceError: if the report has no available-memory figure.
    """
    available = report.budget_memory_bytes
    _require(available is not None, "the device report has no available memory figure")
    return compute_budget(cost, Limits(available_bytes=int(available),
                                       deadline_seconds=deadline_seconds,
                                       steps_per_round=steps_per_round, **limits))
