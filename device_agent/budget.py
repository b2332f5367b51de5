"""Decide C_budget: the largest number of experts a device can train, hold and send per round.

METHOD.md section 4: C_budget(c) is the largest number of experts whose training fits

- memory:  the whole process's peak, i.e. its resident memory before training (measured; the
  weights stand in when it is not) + every expert's saved activations (exact path: a frozen
  expert keeps its pre-activation for the input gradient) + the non-expert part's activations
  and training state + the real trainer's calibrated fixed part + C x (grads + optimizer state + saved activations of one trained expert)
  <= the memory the device can give minus a safety margin (:data:`DEFAULT_MEMORY_MARGIN`,
  configurable), and what training adds stays within
  the device's training-memory quota when it has one; on a discrete GPU this is its own
  memory, and a second pool, the host's, must hold the process's resident host memory
  (measured) + C x what a trained expert adds there (its update's host copy and encoding);
  the pool that runs out first limits C; and
- time:    the round's routing pass (``routing_batches`` forwards without autograd) +
  steps_per_round x step_seconds(C) <= the round's compute window, with
  step_seconds(C) = rest + (E - C) x frozen expert + C x trained expert, where a trained
  expert's time is its forward + backward + optimizer step. There is no routing pass per step:
  the round's experts are chosen once (``device_agent.train``).

Registration uses balanced routing (every expert computes the same share of rows). Once the
round's routing pass has measured the real, imbalanced routing, :func:`plan_round` keeps the
prefix of the strategy's ranked selection that fits under it (expert times and activations
scale with an expert's rows, the non-expert part with the batch's rows), and trains fewer steps
rather than fewer than ``min_experts`` experts when the window is too short.

A configured cap may lower the budget, never raise it past what was measured. Everything here
is pure: no clock, no file, no probe. :class:`BudgetMonitor` takes observations from the agent
and says when to re-measure.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from hfedmoe.errors import ConfigError, DeviceError

if TYPE_CHECKING:
    from device_agent.report import DeviceReport

# "memory": the memory the process plans in (a discrete GPU's own memory there); "host-memory":
# the host's memory on a discrete GPU, when it runs out first
Limit = Literal["memory", "host-memory", "time", "cap", "all-experts", "quota"]
_REL_TOL = 1e-9  # float slack when a predicted round time equals the deadline
# Share of the memory a plan keeps free (``Limits.margin_fraction``; ``agent.memory_margin``,
# ``hfedmoe profile --margin``): the counted and measured peaks are estimates, and the device's
# free memory moves while it trains.
DEFAULT_MEMORY_MARGIN = 0.15


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


# Host buffers of a trained expert's update at once on a discrete GPU: its delta copied to the
# host in the wire dtype, the safetensors blob, and the blob's zstd copy (hfedmoe.wire.encode).
UPDATE_HOST_COPIES = 3


def update_host_bytes(trained_params: int, wire_dtype_bytes: int = 4) -> int:
    """Host memory one trained expert's update takes while it is encoded on a discrete GPU
    (:data:`UPDATE_HOST_COPIES` buffers of its ``trained_params`` elements in the wire dtype,
    fp32 by default; a compressed copy is at most about the blob's size, so an upper bound)."""
    return UPDATE_HOST_COPIES * trained_params * wire_dtype_bytes


def tokens_per_expert(batch_size: int, seq_len: int, top_k: int, experts_per_layer: int) -> int:
    """An expert's share of a layer's routed tokens under balanced routing (rounded up)."""
    _require(min(batch_size, seq_len, top_k, experts_per_layer) >= 1, "sizes must be >= 1")
    return math.ceil(batch_size * seq_len * top_k / experts_per_layer)


def saved_ffn_rows(gated: bool, activation: str = "gelu", *, trained: bool = True) -> int:
    """``ffn_size``-wide tensors per token row one expert saves for backward, beyond its input.

    What autograd keeps (counted with saved-tensor hooks on :class:`hfedmoe.experts.Expert`):
    a frozen plain expert keeps its pre-activation (1); a frozen gated one keeps the gate and
    up projections (2, one tensor), the activation's output for the product (1) and, for
    SiLU (written as ``x * sigmoid(x)`` so that its backward exports), the sigmoid (1). A
    trained expert also keeps the activation's output for its second projection's gradient
    (1); its input is the layer's (:func:`layer_input_bytes`).
    """
    frozen = (3 + (activation in ("silu", "swish"))) if gated else 1
    return frozen + (1 if trained else 0)


def expert_activation_bytes(tokens: int, hidden_size: int, ffn_size: int, *,
                            dtype_bytes: int = 4, gated: bool = True,
                            with_input: bool = True, activation: str | None = None) -> int:
    """Activations one trained MLP expert saves for backward.

    Per token: the input (``hidden_size``; left out with ``with_input=False``, where the
    layer's gathered input is counted once per layer, :func:`layer_input_bytes`), and the
    ``ffn_size``-wide tensors: with ``activation`` given, what autograd keeps
    (:func:`saved_ffn_rows`); without, the up projection and, for a gated (SwiGLU) expert,
    the gate projection, and the activation output (the estimate stored cost models used).
    """
    ffn_rows = ((3 if gated else 2) if activation is None
                else saved_ffn_rows(gated, activation))
    per_token = (hidden_size if with_input else 0) + ffn_rows * ffn_size
    return tokens * per_token * dtype_bytes


def frozen_activation_bytes(tokens: int, ffn_size: int, *, gated: bool, activation: str,
                            dtype_bytes: int = 4) -> int:
    """Activations one frozen expert saves for the gradient to its input
    (:func:`saved_ffn_rows`)."""
    return tokens * saved_ffn_rows(gated, activation, trained=False) * ffn_size * dtype_bytes


def layer_input_bytes(tokens: int, experts_per_layer: int, hidden_size: int, *,
                      dtype_bytes: int = 4) -> int:
    """The gathered input one MoE layer keeps for backward once any of its experts trains.

    The sorted path (:func:`hfedmoe.experts.sorted_experts`) gathers the layer's token-expert
    rows (``tokens x experts_per_layer`` = batch rows x top-k) into one tensor and hands each
    expert a slice of it; a trained expert's weight (or LoRA factor) gradient needs its slice,
    and a slice keeps the whole tensor alive. Measured on the 22 M models (batch 8 x 64): the
    step's peak rises by about this much per layer at the first trained expert in a layer.
    """
    return tokens * experts_per_layer * hidden_size * dtype_bytes


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
        routing_seconds: one batch of the round's routing pass, a forward of the whole model
            without autograd (0: not measured). It runs once per round over a bounded sample
            of the local data (:class:`Limits.routing_batches`), not before every step.
        expert_rows: token rows one expert computed in the timed closures (the balanced share
            ``B x S x top_k / experts per layer``); 0 when unknown. Times and activations of an
            expert scale with its rows under the real routing (:meth:`routed_step_seconds`).
        batch_rows: token rows of the timed batch (``B x S``); the non-expert part scales
            with the rows of a real batch.
        expert_snapshot_bytes: the copy of a trained expert's starting weights the round keeps
            to compute its delta (its weight bytes; 0: not counted).
        expert_optimizer_seconds: the part of ``expert_trained_seconds`` that does not scale
            with rows (one expert's optimizer step and gradient reset); 0: everything scales.
        process_baseline_bytes: the training process's resident memory before training (the
            model loaded, nothing trained); 0 when unknown, then the weights stand in for it.
            With it, predictions are of the whole process's peak.
        trainer_fixed_bytes: what a real trainer's step adds beyond the parts above, found by
            calibration (``device_agent.costs.measure_costs`` trains the real trainer with one
            expert and keeps its measured peak less the model's prediction, 0 when lower): the
            heap pages a step's allocations touch besides what it holds live, the trainer's own
            copies and buffers. Counted once per step, whatever C is; 0: not calibrated.
        host_resident_bytes: on a discrete GPU, the process's resident host memory (RSS)
            before training: the interpreter, torch and the CUDA runtime, the tokenizer, the
            data and whatever the model keeps on the host; the host pool's base. 0: not counted.
        host_per_expert_bytes: on a discrete GPU, what one trained expert adds to host memory in
            a round: its delta's host copy in the wire dtype and the encoded blob (and its
            compressed copy). The other per-expert terms live in GPU memory. 0: not counted.
        num_layers: MoE layers of the model. When set (> 0), the peak is the layered model
            below; 0 (cost models stored before it) keeps the per-expert sum.
        layer_input_bytes: the gathered input one layer keeps once any of its experts trains
            (:func:`layer_input_bytes`), at ``batch_rows``; a trained expert's
            ``expert_activation_bytes`` then leaves its input rows out. Counted only with
            ``num_layers``.
        trainer_row_bytes: what a real trainer's step adds per trained row (per
            ``expert_rows``) beyond the parts above, found by calibration at C = E/4
            (``device_agent.costs.calibrate_trainer_rows``): the C heap's pages the step's many
            small allocations touch beyond what they hold. Counted only with ``num_layers``;
            0: not calibrated.

    The layered peak (``num_layers`` > 0): what a trained expert keeps all round (its optimizer
    state, its starting values) adds up; of what a step allocates and frees, the activations
    (the non-expert part's, every expert's saved rows, each touched layer's gathered input) and
    the trained experts' gradients do not peak together: backward writes a layer's gradients
    while it frees that layer's activations, so the larger of the two counts whole and the
    smaller one layer's share of it (``min / num_layers``). Measured on the 22 M models with
    8 and 32 experts per layer (fp32 and LoRA, C from 1 to E), this is within 5% of the
    step's peak growth, where the per-expert sum over-counted the gradients of a whole-expert
    round by up to 16% and missed the gathered inputs of a LoRA round by up to 19%.
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
    expert_rows: int = 0
    batch_rows: int = 0
    process_baseline_bytes: int = 0
    expert_optimizer_seconds: float = 0.0
    expert_snapshot_bytes: int = 0
    trainer_fixed_bytes: int = 0
    host_resident_bytes: int = 0
    host_per_expert_bytes: int = 0
    num_layers: int = 0
    layer_input_bytes: int = 0
    trainer_row_bytes: int = 0

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
    def resident_bytes(self) -> int:
        """Memory held before training: the measured process baseline, else the weights."""
        if self.process_baseline_bytes:
            return self.process_baseline_bytes
        return self.non_expert_weight_bytes + self.num_experts * self.expert_weight_bytes

    @property
    def base_bytes(self) -> int:
        """Memory with no expert trained: what is resident, what every expert saves when
        frozen, the non-expert part's needs and the trainer's calibrated fixed part."""
        return (self.resident_bytes + self.num_experts * self.expert_frozen_activation_bytes
                + self.non_expert_activation_bytes + self.trainer_fixed_bytes)

    def _row_share(self, rows: float) -> float:
        return rows / self.expert_rows if self.expert_rows else 1.0

    def _trained_extra(self, rows: float) -> float:
        """Bytes one trained expert computing ``rows`` token rows adds over being frozen (the
        per-expert sum, used when ``num_layers`` is 0)."""
        share = self._row_share(rows)
        act = self.expert_activation_bytes * share
        grad = self.expert_grad_bytes
        held = (self.expert_state_bytes - grad + max(grad, act) if grad
                else self.expert_state_bytes + act)
        return held - self.expert_frozen_activation_bytes * share + self.expert_snapshot_bytes

    @property
    def _kept_per_expert(self) -> int:
        """What a trained expert keeps from its first step to the round's end: its optimizer
        state and its starting values (its gradients come and go within a step)."""
        return self.expert_state_bytes - self.expert_grad_bytes + self.expert_snapshot_bytes

    def routed_peak_bytes(self, trained_rows: list[float], all_rows: float,
                          batch_rows: float, layers: int | None = None) -> int:
        """Whole-process peak under the real routing.

        Args:
            trained_rows: token rows per step of each trained expert.
            all_rows: token rows per step over every expert (frozen ones included).
            batch_rows: padded token rows of a batch (``B x padded length``).
            layers: distinct MoE layers among the trained experts (None: as many as can be,
                ``min(len(trained_rows), num_layers)``).
        """
        scale = batch_rows / self.batch_rows if self.batch_rows else 1.0
        frozen_act = self.expert_frozen_activation_bytes * self._row_share(all_rows)
        fixed = self.resident_bytes + self.trainer_fixed_bytes
        if not self.num_layers:
            return int(fixed + frozen_act + self.non_expert_activation_bytes * scale
                       + sum(self._trained_extra(r) for r in trained_rows))
        if layers is None:
            layers = min(len(trained_rows), self.num_layers)
        extra_act = (self.expert_activation_bytes - self.expert_frozen_activation_bytes)
        acts = (self.non_expert_activation_bytes * scale + frozen_act
                + extra_act * self._row_share(sum(trained_rows))
                + min(layers, self.num_layers) * self.layer_input_bytes * scale)
        grads = self.expert_grad_bytes * len(trained_rows)
        transient = max(acts, grads) + min(acts, grads) / self.num_layers
        heap_pages = self.trainer_row_bytes * self._row_share(sum(trained_rows))
        return int(fixed + self._kept_per_expert * len(trained_rows) + transient + heap_pages)

    def routed_step_seconds(self, trained_rows: list[float], all_rows: float,
                            batch_rows: float) -> float:
        """One step's time under the real routing (arguments as :meth:`routed_peak_bytes`):
        the non-expert part scaled by the batch's rows, every expert's frozen cost by its
        rows, and the extra cost of training by the trained experts' rows."""
        scale = batch_rows / self.batch_rows if self.batch_rows else 1.0
        fixed = min(self.expert_optimizer_seconds,
                    self.expert_trained_seconds - self.expert_frozen_seconds)
        per_row = self.expert_trained_seconds - self.expert_frozen_seconds - fixed
        return (self.rest_step_seconds * scale
                + self.expert_frozen_seconds * self._row_share(all_rows)
                + fixed * len(trained_rows) + per_row * self._row_share(sum(trained_rows)))

    @property
    def per_trained_expert_bytes(self) -> int:
        """What training one more expert adds (beyond what it saved while frozen): its
        gradients, optimizer state and saved activations, and the copy of its starting
        weights the round keeps for the delta. With ``num_layers``: once every layer already
        trains an expert, and with the activations the larger transient (the usual case),
        where an expert's gradients count one layer's share."""
        grad = self.expert_grad_bytes
        if self.num_layers:
            return int(self._kept_per_expert + self.expert_activation_bytes
                       - self.expert_frozen_activation_bytes + grad / self.num_layers)
        held = (self.expert_state_bytes - grad + max(grad, self.expert_activation_bytes)
                if grad else self.expert_state_bytes + self.expert_activation_bytes)
        return held - self.expert_frozen_activation_bytes + self.expert_snapshot_bytes

    def peak_bytes(self, c: int) -> int:
        """Predicted peak memory with ``c`` experts trained (balanced routing)."""
        if not self.num_layers:
            return self.base_bytes + c * self.per_trained_expert_bytes
        rows = float(self.expert_rows or 1)
        return self.routed_peak_bytes([rows] * c, rows * self.num_experts,
                                      float(self.batch_rows or 0))

    def host_peak_bytes(self, c: int) -> int:
        """Predicted host memory with ``c`` experts trained (discrete GPU: the host pool)."""
        return self.host_resident_bytes + c * self.host_per_expert_bytes

    def step_seconds(self, c: int) -> float:
        """Predicted time of one step with ``c`` of the ``num_experts`` experts trained, under
        balanced routing (the round's routing pass is counted separately)."""
        return (self.rest_step_seconds
                + (self.num_experts - c) * self.expert_frozen_seconds
                + c * self.expert_trained_seconds)

    def scaled_time(self, factor: float) -> CostModel:
        """The same model with every time multiplied by ``factor`` (throttling, emulation)."""
        _require(factor > 0, "time factor must be > 0")
        return dataclasses.replace(
            self, rest_step_seconds=self.rest_step_seconds * factor,
            expert_frozen_seconds=self.expert_frozen_seconds * factor,
            expert_trained_seconds=self.expert_trained_seconds * factor,
            routing_seconds=self.routing_seconds * factor,
            expert_optimizer_seconds=self.expert_optimizer_seconds * factor)


@dataclass(frozen=True)
class Limits:
    """What the device can give and what the server asks.

    Attributes:
        available_bytes: memory the device can give the training process.
        deadline_seconds: the server's round deadline for local training.
        steps_per_round: local steps in a round.
        margin_fraction: share of ``available_bytes`` kept free (default
            :data:`DEFAULT_MEMORY_MARGIN`, 15 %).
        margin_bytes: fixed bytes kept free, on top of the fraction.
        cap: configured maximum number of trained experts (None: no cap).
        training_quota_bytes: memory the training may add on top of the resident process
            (an app's share on a phone; None: no quota besides ``available_bytes``).
        routing_batches: batches of the round's routing pass (counted in the round's time).
        min_experts: when the window cannot fit every local step with this many experts,
            the device trains fewer steps instead of fewer experts.
        host_available_bytes: on a discrete GPU, the host memory the process can have (its
            resident size plus what the host has available); ``available_bytes`` is then the
            GPU's. None: one pool (CPU, unified memory), as before.
        host_margin_bytes: fixed host bytes kept free, on top of ``margin_fraction`` of
            ``host_available_bytes``.
    """

    available_bytes: int
    deadline_seconds: float
    steps_per_round: int
    margin_fraction: float = DEFAULT_MEMORY_MARGIN
    margin_bytes: int = 0
    cap: int | None = None
    training_quota_bytes: int | None = None
    routing_batches: int = 0
    min_experts: int = 1
    host_available_bytes: int | None = None
    host_margin_bytes: int = 0

    def __post_init__(self) -> None:
        _require(self.available_bytes >= 0, "available_bytes must be >= 0")
        _require(self.host_available_bytes is None or self.host_available_bytes >= 0,
                 "host_available_bytes must be >= 0 or None")
        _require(self.host_margin_bytes >= 0, "host_margin_bytes must be >= 0")
        _require(self.deadline_seconds > 0, "deadline_seconds must be > 0")
        _require(self.steps_per_round >= 1, "steps_per_round must be >= 1")
        _require(0.0 <= self.margin_fraction < 1.0, "margin_fraction must be in [0, 1)")
        _require(self.margin_bytes >= 0, "margin_bytes must be >= 0")
        _require(self.cap is None or self.cap >= 0, "cap must be >= 0 or None")
        _require(self.training_quota_bytes is None or self.training_quota_bytes > 0,
                 "training_quota_bytes must be > 0 or None")
        _require(self.routing_batches >= 0, "routing_batches must be >= 0")
        _require(self.min_experts >= 0, "min_experts must be >= 0")

    @property
    def margin(self) -> int:
        return int(self.available_bytes * self.margin_fraction) + self.margin_bytes

    @property
    def usable_bytes(self) -> int:
        return self.available_bytes - self.margin

    @property
    def host_usable_bytes(self) -> int | None:
        """Host bytes a plan may reach on a discrete GPU (None: one pool)."""
        if self.host_available_bytes is None:
            return None
        host = self.host_available_bytes
        return host - int(host * self.margin_fraction) - self.host_margin_bytes

    def usable_for(self, cost: CostModel) -> int:
        """Whole-process bytes a plan may reach: the margin kept free, and the quota (if any)
        on top of what is resident."""
        usable = self.usable_bytes
        if self.training_quota_bytes is not None:
            usable = min(usable, cost.resident_bytes + self.training_quota_bytes)
        return usable


@dataclass(frozen=True)
class Budget:
    """The decided budget with the predictions and inputs behind it (logged and sent).

    ``memory_max`` / ``time_max`` are the largest counts each constraint allows on its own
    (capped at ``num_experts``), -1 when even no trained expert fits. On a discrete GPU
    (``limits.host_available_bytes`` set) ``memory_max`` is the lower of the two pools':
    ``gpu_memory_max`` the GPU's, ``host_memory_max`` the host's, and ``limit`` is
    ``"host-memory"`` when the host runs out first; ``host_peak_bytes`` is the predicted host
    peak (``peak_bytes`` the GPU's). All three are None with one pool.
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
    steps: int = 0  # local steps planned (may be fewer than limits.steps_per_round)
    # the emulation scale the device was planned at (device_agent.emulation); None: not scaled
    emulation: dict[str, Any] | None = None
    gpu_memory_max: int | None = None
    host_memory_max: int | None = None
    host_peak_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Budget:
        try:
            return cls(**{**data, "cost": CostModel(**data["cost"]),
                          "limits": Limits(**data["limits"])})
        except (TypeError, KeyError) as exc:
            raise DeviceError(f"malformed budget: {exc}") from exc


def layers_of(experts: Iterable[Any]) -> int | None:
    """Distinct MoE layers among ``experts`` (:class:`~hfedmoe.names.ExpertId` or
    ``(layer, expert)`` pairs); None when an entry names no layer."""
    layers = set()
    for e in experts:
        if hasattr(e, "layer_idx"):
            layers.add(e.layer_idx)
        elif isinstance(e, tuple) and e:
            layers.add(e[0])
        else:
            return None
    return len(layers)


def memory_max_experts(cost: CostModel, limits: Limits) -> int:
    """Largest trained-expert count that fits in memory; -1 if the base does not fit."""
    free = limits.usable_for(cost) - cost.base_bytes
    if free < 0:
        return -1
    if cost.num_layers:  # the layered peak is not linear in C: the largest C that fits
        lo, hi = 0, cost.num_experts
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if cost.peak_bytes(mid) <= limits.usable_for(cost) else (lo, mid - 1)
        return lo
    per = cost.per_trained_expert_bytes
    return cost.num_experts if per <= 0 else min(cost.num_experts, free // per)


def host_max_experts(cost: CostModel, limits: Limits) -> int | None:
    """Largest trained-expert count that fits the host pool of a discrete GPU; -1 if the
    process's resident host memory alone does not; None with one pool."""
    usable = limits.host_usable_bytes
    if usable is None:
        return None
    free = usable - cost.host_resident_bytes
    if free < 0:
        return -1
    per = cost.host_per_expert_bytes
    return cost.num_experts if per <= 0 else min(cost.num_experts, free // per)


@dataclass(frozen=True)
class _MemoryFit:
    """What memory allows: the count over both pools, the limit it names and its pools."""

    count: int
    limit: Limit
    gpu: int | None = None
    host: int | None = None


def _memory_fit(cost: CostModel, limits: Limits) -> _MemoryFit:
    """The memory constraint: one pool, or on a discrete GPU whichever pool runs out first."""
    pool = memory_max_experts(cost, limits)
    named: Limit = "quota" if _quota_binds(cost, limits) else "memory"
    host = host_max_experts(cost, limits)
    if host is None:
        return _MemoryFit(pool, named)
    if host < pool:
        return _MemoryFit(host, "host-memory", pool, host)
    return _MemoryFit(pool, named, pool, host)


def _round_seconds(cost: CostModel, limits: Limits, c: int, steps: int) -> float:
    return limits.routing_batches * cost.routing_seconds + steps * cost.step_seconds(c)


def _round_fits(cost: CostModel, limits: Limits, c: int, steps: int | None = None) -> bool:
    steps = limits.steps_per_round if steps is None else steps
    return _round_seconds(cost, limits, c, steps) <= limits.deadline_seconds * (1 + _REL_TOL)


def time_max_experts(cost: CostModel, limits: Limits) -> int:
    """Largest trained-expert count whose round (every local step) fits; -1 if none does."""
    if not _round_fits(cost, limits, 0):
        return -1
    extra = cost.expert_trained_seconds - cost.expert_frozen_seconds
    if extra == 0:
        return cost.num_experts
    per_step = (limits.deadline_seconds - limits.routing_batches * cost.routing_seconds
                ) / limits.steps_per_round
    estimate = (per_step - cost.step_seconds(0)) / extra  # may overflow to inf for tiny extra
    c = cost.num_experts if estimate >= cost.num_experts else max(0, int(estimate))
    while c > 0 and not _round_fits(cost, limits, c):
        c -= 1
    while c < cost.num_experts and _round_fits(cost, limits, c + 1):
        c += 1
    return c


def steps_that_fit(cost: CostModel, limits: Limits, c: int) -> int:
    """Local steps with ``c`` trained experts that fit the window (at most the round's)."""
    room = limits.deadline_seconds * (1 + _REL_TOL) - limits.routing_batches * cost.routing_seconds
    step = cost.step_seconds(c)
    fit = limits.steps_per_round if step <= 0 else int(room // step)
    return max(0, min(limits.steps_per_round, fit))


def _quota_binds(cost: CostModel, limits: Limits) -> bool:
    return limits.usable_for(cost) < limits.usable_bytes


def _nothing_fits(cost: CostModel, limits: Limits) -> str:
    """Why no expert fits memory, in figures a user can check (GiB = 2**30 bytes)."""
    def gib(n: float) -> str:
        return f"{n / 2**30:.2f} GiB"

    quota = (f", at most {gib(limits.training_quota_bytes)} added by training"
             if limits.training_quota_bytes is not None else "")
    return (f"nothing fits memory: the resident model ({gib(cost.resident_bytes)}) and the "
            f"non-expert part's activations and state "
            f"({gib(cost.base_bytes - cost.resident_bytes)}) need {gib(cost.base_bytes)}; "
            f"{gib(limits.usable_for(cost))} usable of {gib(limits.available_bytes)} available "
            f"({gib(limits.margin)} kept free{quota})")


def _host_nothing_fits(cost: CostModel, limits: Limits) -> str:
    """Why no expert fits a discrete GPU's host pool (GiB = 2**30 bytes)."""
    usable, available = limits.host_usable_bytes or 0, limits.host_available_bytes or 0
    return (f"nothing fits host memory: the process's resident host memory "
            f"({cost.host_resident_bytes / 2**30:.2f} GiB) exceeds the "
            f"{usable / 2**30:.2f} GiB usable of {available / 2**30:.2f} GiB available")


def compute_budget(cost: CostModel, limits: Limits) -> Budget:
    """C_budget: the most experts whose training fits memory and the round's window.

    When the window cannot fit every local step with ``limits.min_experts`` experts (but memory
    can), the device keeps ``min_experts`` and plans fewer steps (``Budget.steps``) rather than
    falling to a budget of 0; the reason says so. On a discrete GPU memory is two pools, the
    GPU's and the host's (:func:`host_max_experts`), and the one that runs out first limits it.

    Args:
        cost: measured or estimated costs of the model on this device.
        limits: available memory, quota, margin, window, steps per round and an optional cap.

    Returns:
        The budget, the constraint that set it, the planned steps and the predicted step time
        and whole-process peak memory.
    """
    fit, time_c = _memory_fit(cost, limits), time_max_experts(cost, limits)
    mem_c, steps = fit.count, limits.steps_per_round
    if mem_c < 0:
        c, limit = 0, fit.limit
        reason = (_host_nothing_fits(cost, limits) if fit.limit == "host-memory"
                  else _nothing_fits(cost, limits))
    else:
        floor = min(limits.min_experts, mem_c)
        if time_c < floor:  # fewer steps rather than fewer experts than the floor
            c, limit = floor, "time"
            steps = steps_that_fit(cost, limits, c)
            reason = (f"window fits {steps} of {limits.steps_per_round} steps with {c} "
                      f"expert(s) (memory allows {mem_c}): training fewer steps")
        else:
            c = min(mem_c, time_c)
            if c == cost.num_experts:
                limit, reason = "all-experts", f"all {c} experts fit memory and window"
            elif mem_c <= time_c:
                limit = fit.limit
                reason = f"{limit} allows {mem_c} trained experts (time {time_c})"
            else:
                limit, reason = "time", f"window allows {time_c} trained experts (memory {mem_c})"
        if limits.cap is not None and limits.cap < c:
            limit, reason = "cap", f"configured cap {limits.cap} below measured {c} ({reason})"
            c = limits.cap
            steps = max(steps, steps_that_fit(cost, limits, c)) if steps else steps
        elif limits.cap is not None and limits.cap > c:
            reason += f"; configured cap {limits.cap} is above what was measured, ignored"
    if fit.host is not None:
        reason += f" [pools: gpu memory allows {fit.gpu}, host memory {fit.host}]"
    return Budget(c_budget=c, limit=limit, reason=reason, step_seconds=cost.step_seconds(c),
                  round_seconds=_round_seconds(cost, limits, c, steps),
                  peak_bytes=cost.peak_bytes(c), memory_max=mem_c, time_max=time_c, cost=cost,
                  limits=limits, steps=steps, gpu_memory_max=fit.gpu, host_memory_max=fit.host,
                  host_peak_bytes=None if fit.host is None else cost.host_peak_bytes(c))


@dataclass(frozen=True)
class RoundPlan:
    """What a device trains this round, decided after the round's routing pass.

    Attributes:
        experts: the experts trained for the whole round, most wanted first (a prefix of the
            strategy's selection, at most C_budget).
        steps: local steps planned.
        limit: what set it ("budget": the selection as chosen, "memory", "host-memory" (a
            discrete GPU's host pool), "quota", "time").
        reason: one line for logs and the report.
        step_seconds: predicted seconds per step under the real routing.
        round_seconds: predicted seconds of the round (routing pass included).
        peak_bytes: predicted whole-process peak.
    """

    experts: tuple
    steps: int
    limit: str
    reason: str
    step_seconds: float
    round_seconds: float
    peak_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "experts": [str(e) for e in self.experts]}


def plan_round(cost: CostModel, limits: Limits, ranked: list, expert_rows: dict,
               batch_rows: float, *, enforce: bool = True) -> RoundPlan:
    """Keep the longest prefix of ``ranked`` whose round fits memory and the window under the
    real routing the routing pass measured; below ``limits.min_experts`` train fewer steps.

    Args:
        cost: the device's cost model (measured at the announced shape).
        limits: memory, quota, window, steps, routing batches, min_experts.
        ranked: the strategy's selection, most wanted first (at most C_budget).
        expert_rows: expert -> token rows per step it computes (padding included).
        batch_rows: padded token rows per batch.
        enforce: False keeps every expert of ``ranked`` (fedavg-full ignores budgets) and only
            reports the prediction.
    """
    all_rows = float(sum(expert_rows.values())) or float(cost.expert_rows * cost.num_experts)

    def predict(c: int, steps: int) -> tuple[float, float, int]:
        rows = [float(expert_rows.get(e, 0.0)) for e in ranked[:c]]
        step = cost.routed_step_seconds(rows, all_rows, batch_rows)
        total = limits.routing_batches * cost.routing_seconds + steps * step
        return step, total, cost.routed_peak_bytes(rows, all_rows, batch_rows,
                                                   layers_of(ranked[:c]))

    usable = limits.usable_for(cost)
    window = limits.deadline_seconds * (1 + _REL_TOL)
    steps = limits.steps_per_round
    c = len(ranked)
    limit, reason = "budget", f"{c} expert(s) selected within the budget"
    host_usable = limits.host_usable_bytes
    if enforce:
        while c > 0 and predict(c, steps)[2] > usable:
            c -= 1
        gpu_c = c
        while host_usable is not None and c > 0 and cost.host_peak_bytes(c) > host_usable:
            c -= 1
        if c < len(ranked):
            limit = ("host-memory" if c < gpu_c else
                     "quota" if _quota_binds(cost, limits) else "memory")
            reason = f"{limit} fits {c} of the {len(ranked)} selected experts"
        mem_c = c
        while c > 0 and predict(c, steps)[1] > window:
            c -= 1
        floor = min(limits.min_experts, mem_c)
        if c < floor:
            c = floor
            step = predict(c, steps)[0]
            room = window - limits.routing_batches * cost.routing_seconds
            steps = max(1, min(steps, int(room // step))) if step > 0 else steps
            limit = "time"
            reason = (f"window fits {steps} of {limits.steps_per_round} steps with {c} "
                      f"expert(s): training fewer steps")
        elif c < mem_c:
            limit, reason = "time", f"window fits {c} of the {len(ranked)} selected experts"
    step, total, peak = predict(c, steps)
    return RoundPlan(tuple(ranked[:c]), steps, limit, reason, step, total, peak)


def budget_from_report(report: DeviceReport, cost: CostModel, deadline_seconds: float,
                       steps_per_round: int, held_bytes: int | None = 0,
                       host_held_bytes: int | None = 0, **limits: Any) -> Budget:
    """:func:`compute_budget` with the available memory taken from a device report.

    ``held_bytes`` is what the process already held when the report's available memory was
    read (the whole-process limit is their sum). On a discrete GPU that is GPU memory, and the
    host is a second pool: its available memory plus ``host_held_bytes`` (the process's RSS
    then) bounds the host side (``cost.host_resident_bytes`` + C x
    ``cost.host_per_expert_bytes``).

    Raises:
        DeviceError: if the report has no available-memory figure.
        ConfigError: on a discrete GPU without a GPU memory figure, or with a negative one
            (naming the field).
    """
    available = report.budget_memory_bytes
    _require(available is not None, "the device report has no available memory figure")
    host = None
    if report.discrete_gpu:
        host = _host_pool(report, int(host_held_bytes or 0))
        if host is not None and not cost.host_resident_bytes:  # not measured: the RSS then
            cost = dataclasses.replace(cost, host_resident_bytes=int(host_held_bytes or 0))
    return compute_budget(cost, Limits(available_bytes=int(available) + int(held_bytes or 0),
                                       deadline_seconds=deadline_seconds,
                                       steps_per_round=steps_per_round,
                                       host_available_bytes=host, **limits))


def _host_pool(report: DeviceReport, held: int) -> int | None:
    """A discrete GPU's host pool (its GPU memory checked): available host memory + ``held``;
    None where the host's available memory is unknown (the GPU's pool alone then)."""
    for name in ("gpu_memory_free_bytes", "gpu_memory_total_bytes"):
        value = getattr(report, name)
        if value is None or value < 0:
            raise ConfigError(
                f"device {report.source!r}: {name} = {value!r}: a discrete GPU (accelerator "
                f"'cuda', unified_memory false) needs its own memory as a figure >= 0 to plan "
                f"the GPU pool")
    host = report.host_memory_bytes
    return None if host is None else int(host) + held
