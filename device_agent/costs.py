"""Measure the real model's step costs on this device and turn them into a budget.

The closures time *one expert of the actual model shape* at the configured batch and sequence
length (its share of the routed tokens: B x S x top_k / experts per layer), trained (forward,
backward and its optimizer step) and frozen, the non-expert part of a training step (attention,
embeddings, routers, head, and the optimizer step of gates and head) with the experts' compute
removed, and the routing pre-pass (a forward of the whole model without autograd, plus the
batch statistics) that ``train_round`` runs once per round. :func:`cost_model` combines them
with the model's parameter counts; two steps of the round's own trainer with one expert then
calibrate what a real step adds beyond that (:func:`calibrate_trainer_bytes`); :func:`decide_budget` applies the device's memory and the
round deadline (:func:`device_agent.budget.compute_budget`), scaling times when a profile
emulates another device.

With ``adapter="lora"`` a trained expert is one that carries rank-r factors over its frozen
base (``train.adapter = "lora"``): it holds gradients and optimizer state of its factors and
biases only, keeps no copy of its base weights for the delta, saves the rank-r intermediates
besides what a trained expert saves, and every timed step trains factors, so the budget is the
one a LoRA round can afford.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch

from device_agent import heap
from device_agent.budget import (
    DEFAULT_MEMORY_MARGIN,
    Budget,
    CostModel,
    Limits,
    RoundPlan,
    budget_from_report,
    expert_activation_bytes,
    expert_state_bytes,
    frozen_activation_bytes,
    layer_input_bytes,
    plan_round,
    tokens_per_expert,
    update_host_bytes,
)
from device_agent.heap import bound_heap
from device_agent.report import DeviceReport, time_scale
from device_agent.throughput import StepCosts, _time_calls, measure_step_costs
from hfedmoe.config import MethodConfig, TrainConfig
from hfedmoe.errors import ConfigError, DeviceError
from hfedmoe.experts import Expert, ExpertShape
from hfedmoe.importance import compute_batch_stats
from hfedmoe.lora import ExpertFactors, LoRASpec, attach_factors, detach_factors, factor_params
from hfedmoe.models.base import MoEModel
from hfedmoe.names import ExpertId
from hfedmoe.quantize import is_quantized
from hfedmoe.trainer import EagerTrainer


def _skip_experts(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """No expert compute; the product keeps autograd's paths to the input and to the routing
    weights (gates), so the backward still runs through the whole network as in training."""
    return x * weights.sum(-1, keepdim=True) * 0


@contextlib.contextmanager
def _experts_skipped(model: MoEModel) -> Iterator[None]:
    for layer in model.layers:
        layer.bank.forward = _skip_experts  # instance attribute shadows the method
    try:
        yield
    finally:
        for layer in model.layers:
            del layer.bank.forward


@dataclass(frozen=True)
class MeasuredCosts:
    cost: CostModel
    steps: StepCosts
    tokens_per_expert: int
    batch_size: int = 0
    seq_len: int = 0
    adapter: str = "full"  # what a trained expert trains: its weights, or LoRA factors
    lora_rank: int = 0


def _sample_batch(model: MoEModel, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    vocab = getattr(model.tokenizer, "vocab_size", None) or 512
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(1000, vocab - 1), vocab, (batch_size, seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if model.task == "classification":
        batch["labels"] = torch.zeros(batch_size, dtype=torch.long)
    else:
        batch["labels"] = ids.clone()
    return batch


def _expert_steps(shape: ExpertShape, tokens: int, device: torch.device, optimizer: str,
                  detach_frozen: bool, lora: LoRASpec | None
                  ) -> tuple[Callable[[], None], Callable[[], None]]:
    """One expert of the model's shape on ``tokens`` rows: a trained step (forward, backward,
    optimizer step; through LoRA factors when ``lora`` is given) and a frozen one (no weight
    gradient; the input gradient flows through unless ``detach_frozen``)."""
    expert = Expert(shape).to(device)
    x = torch.randn(tokens, shape.d_model, device=device)
    trained: list[torch.Tensor] = list(expert.parameters())
    factors = None
    if lora is not None:  # the base weights stay frozen; factors and biases train
        factors = ExpertFactors(expert.w_in, expert.w_out, lora)
        trained = [p for n, p in expert.named_parameters() if n.startswith("b_")]
        trained += list(factors.factors.values())
    expert_opt = _optimizer(trained, optimizer)

    def run_expert() -> None:
        expert.requires_grad_(lora is None)
        for t in trained:
            t.requires_grad_(True)
        expert.factors = factors
        xin = x.clone().requires_grad_(True)
        expert(xin).sum().backward()
        expert_opt.step()
        expert_opt.zero_grad(set_to_none=True)

    def run_frozen() -> None:
        expert.requires_grad_(False)
        expert.factors = None
        if detach_frozen:
            with torch.no_grad():
                expert(x)
        else:  # exact path: no weight gradient, but the input gradient flows through
            xin = x.clone().requires_grad_(True)
            expert(xin).sum().backward()

    return run_expert, run_frozen


def _model_steps(model: MoEModel, batch: dict[str, torch.Tensor], optimizer: str
                 ) -> tuple[Callable[[], None], Callable[[], None], Callable[[], None]]:
    """Steps of the whole model on ``batch``, gates and head trained as in every step: the
    non-expert part (experts' compute skipped), the routing pre-pass (a forward without
    autograd, plus the batch statistics), and a whole step with no expert trained."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.set_trainable(())  # gates and head train, as in every step
    rest_opt = _optimizer(list(model.trainable_parameters().values()), optimizer)

    def run_rest() -> None:
        with _experts_skipped(model):
            model.module(**batch).loss.backward()
        rest_opt.step()
        model.module.zero_grad(set_to_none=True)

    def run_routing() -> None:
        with torch.no_grad(), model.capture(batch["attention_mask"]) as cap:
            model.module(**inputs)
        compute_batch_stats(cap.scores, cap.routed, MethodConfig())

    def run_step() -> None:  # a whole training step with no expert trained (gates and head)
        model.module(**batch).loss.backward()
        rest_opt.step()
        model.module.zero_grad(set_to_none=True)

    return run_rest, run_routing, run_step


def measure_costs(model: MoEModel, batch_size: int, seq_len: int, optimizer: str = "adamw",
                  detach_frozen: bool = False, repeats: int = 5, adapter: str = "full",
                  lora: LoRASpec | None = None, unified_memory: bool = False) -> MeasuredCosts:
    """Time one expert (trained and frozen) and the non-expert step of ``model`` here.

    ``adapter="lora"`` (with ``lora``, default rank 8) measures experts trained through LoRA
    factors instead of their weights. On CUDA the baseline and a step's growth are the
    allocator's (:func:`held_bytes`; ``unified_memory`` adds the process's RSS, as on a
    Jetson); on a discrete GPU the process's RSS after the measurement is the host pool's
    base (:func:`with_host_pool`).
    """
    bound_heap()  # the resident size follows what training holds (device_agent.heap)
    device = next(model.module.parameters()).device
    with heap.training_kernels("float32", device):  # as a float32 round trains
        return _measure_costs(model, batch_size, seq_len, optimizer, detach_frozen, repeats,
                              adapter, lora, unified_memory, device)


def _measure_costs(model: MoEModel, batch_size: int, seq_len: int, optimizer: str,
                   detach_frozen: bool, repeats: int, adapter: str, lora: LoRASpec | None,
                   unified_memory: bool, device: torch.device) -> MeasuredCosts:
    lora = _lora_spec(adapter, lora)
    layer = model.layers[0]
    tokens = tokens_per_expert(batch_size, seq_len, layer.top_k, layer.num_experts)
    run_expert, run_frozen = _expert_steps(layer.bank.shape, tokens, device, optimizer,
                                           detach_frozen, lora)
    baseline = held_bytes(device, unified_memory)  # before any training state exists
    batch = {k: v.to(device) for k, v in _sample_batch(model, batch_size, seq_len).items()}
    run_rest, run_routing, run_step = _model_steps(model, batch, optimizer)

    snapshot = _FlatSnapshot(model)
    steps = measure_step_costs(run_expert, run_rest, device, repeats,
                               run_expert_frozen=run_frozen, run_routing=run_routing)
    release_freed_memory()  # the step's growth is measured as training will see it
    whole0, growth = _time_calls(run_step, device, repeats, 1)
    cost = cost_model(model, steps, tokens, optimizer, detach_frozen, lora=lora)
    cost = _anchor_on_whole_steps(model, batch, cost, statistics.median(whole0), optimizer,
                                  device, repeats, lora)
    # What a real step adds with no expert trained, measured whole (the non-expert part's
    # activations and state, every expert's saved activations, the allocator's and autograd's
    # buffers): the frozen experts' share is modelled per row, the rest is the non-expert part.
    measured_rest = growth - cost.num_experts * cost.expert_frozen_activation_bytes
    cost = dataclasses.replace(
        cost, batch_rows=batch_size * seq_len, process_baseline_bytes=baseline,
        non_expert_activation_bytes=max(cost.non_expert_activation_bytes, measured_rest))
    del run_expert, run_frozen, run_rest, run_routing, run_step  # their buffers go first
    trainer_cfg = TrainConfig(batch_size=batch_size, optimizer=_optimizer_name(optimizer),
                              lr=1e-6, detach_frozen=detach_frozen, **_adapter_fields(lora))
    cost = dataclasses.replace(cost, trainer_fixed_bytes=calibrate_trainer_bytes(
        model, batch, cost, trainer_cfg, unified_memory))
    cost = dataclasses.replace(cost, trainer_row_bytes=calibrate_trainer_rows(
        model, batch, cost, trainer_cfg, unified_memory))
    model.set_trainable(())
    snapshot.restore(model)  # the timing and calibration steps must not change the model
    del snapshot
    release_freed_memory()  # what the timing steps freed must not count as resident
    if device.type == "cuda" and not unified_memory:  # the host is a pool of its own
        cost = with_host_pool(cost, resident_bytes())
    return MeasuredCosts(cost, steps, tokens, batch_size, seq_len,
                         "full" if lora is None else "lora", 0 if lora is None else lora.rank)


class _FlatSnapshot:
    """The tensors of a model that training can change (a quantized weight never trains),
    copied into one buffer per dtype.

    One clone per tensor (``MoEModel.state``) leaves thousands of small blocks in the C heap
    between the blocks the timing steps free; the calibration's trainer then reuses those
    freed blocks instead of growing, and read 0 MB where the same steps after
    :func:`measure_costs` returned read 8-15 MB (32-expert model, LoRA, C = 1). A few large
    buffers are mapped apart from the heap.
    """

    def __init__(self, model: MoEModel) -> None:
        self.layout: list[tuple[str, torch.dtype, int, int]] = []  # key, dtype, offset, numel
        sizes: dict[torch.dtype, int] = {}
        for key in model.keys():
            p = model.parameter(key)
            if is_quantized(p):
                continue
            self.layout.append((key, p.dtype, sizes.get(p.dtype, 0), p.numel()))
            sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
        device = next(model.module.parameters()).device
        self.flat = {dt: torch.empty(n, dtype=dt, device=device) for dt, n in sizes.items()}
        with torch.no_grad():
            for key, dt, off, n in self.layout:
                self.flat[dt][off:off + n].copy_(model.parameter(key).reshape(-1))

    def restore(self, model: MoEModel) -> None:
        with torch.no_grad():
            for key, dt, off, n in self.layout:
                p = model.parameter(key)
                p.copy_(self.flat[dt][off:off + n].view(p.shape))


def with_host_pool(cost: CostModel, host_resident: int) -> CostModel:
    """``cost`` with a discrete GPU's host pool: the process's resident host memory and, per
    trained expert, its update's host buffers (:func:`device_agent.budget.update_host_bytes`
    of what it trains: ``expert_snapshot_bytes`` holds them at fp32)."""
    return dataclasses.replace(cost, host_resident_bytes=int(host_resident),
                               host_per_expert_bytes=update_host_bytes(
                                   cost.expert_snapshot_bytes // 4))


def _lora_spec(adapter: str, lora: LoRASpec | None) -> LoRASpec | None:
    if adapter not in ("full", "lora"):
        raise DeviceError(f"unknown adapter {adapter!r}; known: full, lora")
    return (lora or LoRASpec()) if adapter == "lora" else None


def _optimizer_name(name: str) -> Literal["adamw", "sgd"]:
    return "sgd" if name == "sgd" else "adamw"


def _adapter_fields(lora: LoRASpec | None) -> dict[str, Any]:
    if lora is None:
        return {"adapter": "full"}
    return {"adapter": "lora", "lora_rank": lora.rank, "lora_alpha": lora.alpha}


# Readings per calibration, their median kept: one reading of the same steps moves by several
# MB with the heap's state (8-expert model, LoRA, C = 1: 5.4-6.6 MB in three readings, 0-15 MB
# between processes), as much as the term it calibrates.
CALIBRATION_REPEATS = 3


def calibrate_trainer_bytes(model: MoEModel, batch: dict[str, torch.Tensor], cost: CostModel,
                            train_cfg: TrainConfig, unified_memory: bool = False,
                            steps: int = 2, repeats: int = CALIBRATION_REPEATS) -> int:
    """The trainer's fixed part (``CostModel.trainer_fixed_bytes``): what ``steps`` steps of
    the round's own trainer (:class:`~hfedmoe.trainer.EagerTrainer`, the heap trimmed after
    each step as the round does) add over the resident size with C = 1 (the expert that
    computes the most rows of ``batch``), less what ``cost`` predicts for them; 0 when the
    prediction is not lower, or when this trainer cannot train the model as configured (a
    quantized base with ``adapter = "full"``).

    The model's trainable set and LoRA factors are put back; its weights are not (the caller
    restores them).
    """
    rows = _batch_rows(model, batch)
    residual = _median_residual(model, batch, cost, train_cfg, rows,
                                [max(rows, key=lambda e: rows[e])], unified_memory, steps,
                                repeats)
    return 0 if residual is None else max(0, residual)


def calibrate_trainer_rows(model: MoEModel, batch: dict[str, torch.Tensor], cost: CostModel,
                           train_cfg: TrainConfig, unified_memory: bool = False,
                           steps: int = 2, repeats: int = CALIBRATION_REPEATS) -> int:
    """What a real trainer's step adds per trained row (``CostModel.trainer_row_bytes``, per
    balanced expert's rows) beyond ``cost`` with its fixed part: ``steps`` steps of the round's
    trainer with the E/4 experts that compute the most rows of ``batch``, their growth less the
    prediction, over the rows they train; 0 when the prediction is not lower, without layers
    (``num_layers`` 0) or when this trainer cannot train the model as configured.

    What it catches: the C heap's pages that a step's many small allocations (each trained
    expert's factor gradients, optimizer moments and row blocks, under the bounded heap's
    mmap threshold, :mod:`device_agent.heap`) touch beyond what they hold live. Measured on the
    32-expert model with LoRA after ``measure_costs``: 15-22 MB over the counted terms at
    C = 48-192, from 0-6 MB at C = 1.
    """
    if not cost.num_layers:
        return 0
    rows = _batch_rows(model, batch)
    chosen = sorted(rows, key=lambda e: (-rows[e], e))[:max(2, cost.num_experts // 4)]
    residual = _median_residual(model, batch, cost, train_cfg, rows, chosen, unified_memory,
                                steps, repeats)
    share = sum(rows[e] for e in chosen) / max(cost.expert_rows, 1)
    if residual is None or residual <= 0 or share <= 0:
        return 0
    return int(residual / share)


def _median_residual(model: MoEModel, batch: dict[str, torch.Tensor], cost: CostModel,
                     train_cfg: TrainConfig, rows: dict[ExpertId, float],
                     chosen: list[ExpertId], unified_memory: bool, steps: int,
                     repeats: int) -> int | None:
    """The median of ``repeats`` readings of :func:`_trainer_residual` (None: this trainer
    cannot train the model)."""
    readings = []
    for _ in range(max(1, repeats)):
        r = _trainer_residual(model, batch, cost, train_cfg, rows, chosen, unified_memory, steps)
        if r is None:
            return None
        readings.append(r)
    return int(statistics.median(readings))


def _batch_rows(model: MoEModel, batch: dict[str, torch.Tensor]) -> dict[ExpertId, float]:
    """Token rows each expert computes in one forward of ``batch``."""
    with torch.no_grad(), model.capture(batch["attention_mask"]) as cap:
        model.module(**{k: v for k, v in batch.items() if k != "labels"})
    return {ExpertId(layer, e): float(n) for layer in sorted(cap.expert_rows)
            for e, n in enumerate(cap.expert_rows[layer])}


def _trainer_residual(model: MoEModel, batch: dict[str, torch.Tensor], cost: CostModel,
                      train_cfg: TrainConfig, rows: dict[ExpertId, float],
                      chosen: list[ExpertId], unified_memory: bool, steps: int) -> int | None:
    """What ``steps`` steps of the round's trainer on ``chosen`` add over the resident size,
    less what ``cost`` predicts for them (None: this trainer cannot train the model)."""
    device = next(model.module.parameters()).device
    release_freed_memory()  # as the round's planner does before reading its baseline
    before = held_bytes(device, unified_memory)
    held: list[EagerTrainer] = []
    detached = [layer.bank.detach_frozen for layer in model.layers]

    def run_round() -> None:  # what the round does from its baseline on (device_agent.train)
        for layer in model.layers:
            layer.bank.detach_frozen = train_cfg.detach_frozen
        held.append(EagerTrainer(model, chosen, train_cfg, MethodConfig()))
        for _ in range(steps):
            held[0].step(batch)
            heap.after_step()

    try:
        growth = _time_calls(run_round, device, 1, 0)[1]
    except ConfigError:  # e.g. a quantized base trains LoRA factors only: nothing to calibrate
        return None
    finally:
        if held:
            held[0].deltas()  # ends the round: the trainable set and the factors come off
        model.set_trainable(())
        for layer, detach in zip(model.layers, detached, strict=True):
            layer.bank.detach_frozen = detach
    at_baseline = dataclasses.replace(cost, process_baseline_bytes=before)
    predicted = at_baseline.routed_peak_bytes(
        [rows[e] for e in chosen], sum(rows.values()), float(batch["attention_mask"].numel()),
        len({e.layer_idx for e in chosen})) - before
    return int(growth - predicted)


def _anchor_on_whole_steps(model: MoEModel, batch: dict[str, torch.Tensor], cost: CostModel,
                           step0: float, optimizer: str, device: torch.device,
                           repeats: int, lora: LoRASpec | None = None) -> CostModel:
    """Anchor the step-time model on whole training steps of the real model.

    One expert's closure timed alone is noisy from process to process (its gradients and
    optimizer state are allocated anew each call, and how the C allocator serves that depends
    on the process's history: 0.012-0.021 s for the same expert in four processes), so the
    times that decide the budget come from real steps instead: ``step0`` with no expert
    trained sets the non-expert part (minus every expert's frozen share); steps with E/4 and
    with all experts trained set the extra cost of a trained expert, split into a part per
    expert (its optimizer step, timed inside those steps) and a part per token row (weight
    gradients), fitted by least squares through both.
    """
    with torch.no_grad(), model.capture(batch["attention_mask"]) as cap:
        model.module(**{k: v for k, v in batch.items() if k != "labels"})
    ranked = [ExpertId(layer, e) for layer in sorted(cap.expert_rows)
              for e in range(len(cap.expert_rows[layer])) if cap.expert_rows[layer][e] > 0]
    ranked.sort(key=lambda e: (e.expert_idx, e.layer_idx))  # round-robin over the layers
    points = []  # (trained rows in balanced-expert units, experts, step seconds, optimizer s)
    for k in sorted({max(1, cost.num_experts // 4), len(ranked)}):
        chosen = ranked[:k]
        rows = sum(float(cap.expert_rows[e.layer_idx][e.expert_idx]) for e in chosen)
        step_k, opt_k = _time_trained_step(model, batch, chosen, optimizer, device, repeats,
                                           lora)
        points.append((rows / max(cost.expert_rows, 1), len(chosen), step_k, opt_k))
    # the optimizer's part is per expert (its parameters), the weight gradients' part per row:
    # least squares through the anchors with the intercept fixed at step0
    per_expert = statistics.median(o / n for _, n, _, o in points)
    ys = [(share, max(0.0, t - step0 - per_expert * n)) for share, n, t, _ in points]
    per_row_part = sum(s * y for s, y in ys) / max(sum(s * s for s, _ in ys), 1e-12)
    rest = max(0.0, step0 - cost.num_experts * cost.expert_frozen_seconds)
    return dataclasses.replace(
        cost, rest_step_seconds=rest, expert_optimizer_seconds=per_expert,
        expert_trained_seconds=cost.expert_frozen_seconds + per_row_part + per_expert)


def _time_trained_step(model: MoEModel, batch: dict[str, torch.Tensor],
                       chosen: list[ExpertId], optimizer: str, device: torch.device,
                       repeats: int, lora: LoRASpec | None = None) -> tuple[float, float]:
    """Median seconds of a whole step with ``chosen`` trained (through LoRA factors when
    ``lora`` is given), and of its optimizer part."""
    model.set_trainable(chosen)
    params = list(model.trainable_parameters().values())
    if lora is not None:
        factors = attach_factors(model, chosen, lora)
        params = list(model.trainable_parameters().values())  # the bases are frozen now
        params += [t for f in factors.values() for t in f.factors.values()]
    opt = _optimizer(params, optimizer)
    opt_times: list[float] = []

    def run_trained() -> None:
        model.module(**batch).loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        opt.step()
        model.module.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        opt_times.append(time.perf_counter() - t0)

    try:
        step = statistics.median(_time_calls(run_trained, device, repeats, 1)[0])
    finally:
        detach_factors(model, chosen)
    return step, statistics.median(opt_times[1:] or opt_times)


def release_freed_memory() -> None:
    """Hand memory the C allocator keeps after frees back to the OS (glibc ``malloc_trim``).

    Without it, the resident size after the cost measurement (which trains every expert once)
    stays hundreds of MB above what the process holds live, and a baseline read from it would
    count that twice. A no-op where glibc is not the allocator.
    """
    heap.release_freed_memory()


def held_bytes(device: torch.device | None = None, unified_memory: bool = False) -> int:
    """What this process holds now in the memory its training budget is limited by: on a
    discrete CUDA GPU the bytes its allocator has allocated there (weights and activations
    live there; the host's RSS is the second pool, :func:`with_host_pool`); elsewhere its
    resident memory, plus its CUDA
    allocations on a unified-memory device (a Jetson's GPU allocates from the same RAM)."""
    if device is not None and device.type == "cuda":
        gpu = int(torch.cuda.memory_allocated(device))
        return gpu if not unified_memory else resident_bytes() + gpu
    return resident_bytes()


def resident_bytes() -> int:
    """This process's resident memory now (0 where psutil cannot tell)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # noqa: BLE001 - a probe that is unavailable is not fatal
        return 0


def _optimizer(params: list[torch.nn.Parameter], name: str) -> torch.optim.Optimizer:
    """The optimizer ``train_round`` uses, at a learning rate that keeps the timed steps tame."""
    from hfedmoe.trainer import make_optimizer

    cfg = TrainConfig(optimizer="sgd" if name == "sgd" else "adamw", lr=1e-6)
    return make_optimizer({str(i): p for i, p in enumerate(params)}, cfg)


def cost_model(model: MoEModel, steps: StepCosts, tokens: int, optimizer: str,
               detach_frozen: bool = False, lora: LoRASpec | None = None) -> CostModel:
    """Bytes from the model's parameter counts, seconds from the measured closures.

    A trained expert holds gradients and optimizer state of what trains (its weights, or with
    ``lora`` its factors and biases), the copy of its starting values for the delta (with
    LoRA: its biases; the factors themselves are held too) and its saved activations (with
    LoRA also the rank-r intermediates of both projections).
    """
    shape = model.layers[0].bank.shape
    per_expert = shape.params_per_expert
    d_in = shape.d_ff * (2 if shape.gated else 1)
    trained = per_expert  # elements that train, and held for the delta
    held = per_expert
    rank_act = 0
    if lora is not None:
        biases = (d_in + shape.d_model) if shape.bias else 0
        n_factors = factor_params(shape.d_model, d_in, shape.d_ff, lora)
        trained = n_factors + biases
        held = n_factors + biases  # the factors, and the biases' starting values
        rank_act = tokens * 2 * lora.rank * 4
    total = sum(p.numel() for p in model.module.parameters())
    num_experts = sum(layer.num_experts for layer in model.layers)
    trainable_rest = sum(p.numel() for k, p in model.trainable_parameters().items()
                         if not k.startswith("layers.") or ".gate." in k)
    return CostModel(
        num_experts=num_experts,
        non_expert_weight_bytes=4 * (total - num_experts * per_expert),
        expert_weight_bytes=4 * per_expert,
        expert_state_bytes=expert_state_bytes(trained, optimizer),
        expert_activation_bytes=expert_activation_bytes(
            tokens, shape.d_model, shape.d_ff, gated=shape.gated, with_input=False,
            activation=shape.activation) + rank_act,
        num_layers=len(model.layers),
        layer_input_bytes=layer_input_bytes(tokens, model.layers[0].num_experts, shape.d_model),
        expert_grad_bytes=4 * trained,
        expert_snapshot_bytes=4 * held,
        expert_frozen_activation_bytes=0 if detach_frozen
        else frozen_activation_bytes(tokens, shape.d_ff, gated=shape.gated,
                                     activation=shape.activation),
        non_expert_activation_bytes=steps.rest_peak_bytes
        + expert_state_bytes(trainable_rest, optimizer),
        rest_step_seconds=steps.rest_seconds,
        expert_frozen_seconds=min(steps.expert_frozen_seconds or 0.0, steps.expert_seconds),
        expert_trained_seconds=steps.expert_seconds,
        routing_seconds=steps.routing_seconds or 0.0,
        expert_rows=tokens)


def decide_budget(report: DeviceReport, cost: CostModel, deadline_s: float, steps_per_round: int,
                  host: DeviceReport | None = None, cap: int | None = None,
                  margin_fraction: float = DEFAULT_MEMORY_MARGIN, routing_batches: int = 0,
                  min_experts: int = 1, quota_bytes: int | None = None) -> Budget:
    """C_budget for ``report``'s device; times are scaled from ``host`` when emulating.

    The memory a live device can give is what was available when it was probed plus what
    this process already held then (the limit is on the whole process); an emulated device
    gives its profile's figure. On a discrete GPU the host's available memory plus the
    process's RSS then is a second pool (:func:`device_agent.budget.budget_from_report`). ``quota_bytes`` (or the profile's training-memory quota)
    bounds what training may add on top of the resident process.
    """
    if report.emulated and host is not None:
        cost = cost.scaled_time(time_scale(host, report))
    quota = quota_bytes or report.training_memory_quota_bytes
    return budget_from_report(report, cost, deadline_s, max(1, steps_per_round), cap=cap,
                              margin_fraction=margin_fraction, routing_batches=routing_batches,
                              min_experts=min_experts, training_quota_bytes=quota or None,
                              held_bytes=0 if report.emulated else report.held_bytes(),
                              host_held_bytes=0 if report.emulated else report.process_rss_bytes)


def steps_per_round(num_examples: int, batch_size: int, epochs: int, max_steps: int = 0) -> int:
    steps = math.ceil(num_examples / max(batch_size, 1)) * max(epochs, 1)
    return min(steps, max_steps) if max_steps else steps


def round_limits(budget: Budget, resident: int = 0, host_resident: int = 0
                 ) -> tuple[CostModel, Limits]:
    """The cost model and limits a round plan uses: the budget's, with the process's resident
    memory measured now (before training) as the baseline when known (``host_resident``: its
    host RSS, the host pool's base on a discrete GPU)."""
    cost = budget.cost
    if resident:
        cost = dataclasses.replace(cost, process_baseline_bytes=resident)
    if host_resident and budget.limits.host_available_bytes is not None:
        cost = dataclasses.replace(cost, host_resident_bytes=host_resident)
    return cost, budget.limits


def make_planner(budget: Budget, enforce: bool = True, resident: int | None = None,
                 device: torch.device | None = None, unified_memory: bool = False
                 ) -> Callable[[Any, Any], RoundPlan]:
    """``planner(selection, routing_stats)`` for :func:`device_agent.train.train_round`:
    the prefix of the selection (and the steps) that fit memory and the window under the
    routing the round's routing pass measured (:func:`device_agent.budget.plan_round`).

    ``resident`` is what the process holds before training (measured now when None, in the
    memory the budget plans with on ``device``: :func:`held_bytes`; 0 keeps the budget's
    baseline, e.g. for an emulated device).
    """
    host_resident = 0
    if resident is None:
        release_freed_memory()  # the last round's freed state is not resident any more
        resident = held_bytes(device, unified_memory)
        host_resident = resident_bytes()  # the host pool's base on a discrete GPU
    cost, limits = round_limits(budget, resident, host_resident)

    def planner(selection: Any, stats: Any) -> RoundPlan:
        return plan_round(cost, limits, list(selection.ranked()), dict(stats.expert_rows),
                          stats.batch_rows, enforce=enforce)

    return planner
