"""The local fine-tuning recipe: one client's round of HFedMoE training.

One round, one expert set (METHOD.md section 3, revised Decision; docs/method.md):

1. **Route.** A forward pass without autograd over a bounded, seeded sample of the round's
   batches (``train.selection_batches``) captures the gate scores G_e(x) of every real token;
   the core computes s_b, KL_b and I_b per batch (Eq. 3-14) and averages them over the sample
   (:class:`~hfedmoe.round_stats.RoundAccumulator`). The same pass counts the token rows each
   expert computes, the real (imbalanced) routing the cost model predicts from.
2. **Select.** The strategy picks E_active(c) once for the round with |E_active| <= C_budget
   (Eq. 15 on the round's mean I_b for HFedMoE; every expert for fedavg-full, the fixed
   sub-model for fedmoe, a seeded draw among the routed experts for fedavg-random). A planner
   (the device's cost model) may keep a shorter prefix, or fewer steps, so that the round fits
   memory and the window under the real routing.
3. **Train.** One loop over a :class:`~hfedmoe.trainer.Trainer` (eager PyTorch, or the
   ExecuTorch program a phone runs; the runtime only decides which trainer is built and the
   batch shape) trains exactly that set, the gates and the shared parts for every step of the
   round: other experts get no gradient and no optimizer state. The loop stops at the end of
   the batches, before a step that would overrun the deadline, or when ``on_step`` raises
   :class:`~hfedmoe.trainer.StopTraining`. There is no routing pass per step: usage u_c(e)
   (Eq. 16) and importance for the update come from the training forwards' own gate capture
   (the ExecuTorch program does not expose its gates, so there they come from the routing
   pass).

A round is given one :class:`RoundContext` (model, data, strategy, budget, configs, ids,
limits and hooks): ``train_round(RoundContext(model, data, strategy=s, budget=4, train=cfg))``.

``train.reselect = "batch"`` keeps the paper's per-batch selection as an option, bounded so the
round's union never exceeds C_budget (an expert that leaves the active set frees its optimizer
state); it runs a routing pass before every step.

The client's :class:`~hfedmoe.update.SparseUpdate` holds deltas of exactly the experts that
trained, plus gates and shared parts, the usage, the mean importance and the routed/updated
sets; its ``meta`` says what the round held (budget, plan, experts with optimizer state).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from device_agent.heap import after_step, training_kernels
from export.programs import bucket_for, check_task
from export.runtime import ExecuTorchTrainer
from hfedmoe.config import MethodConfig, TrainConfig
from hfedmoe.data import PairDataset, TextDataset, collate, iter_minibatches
from hfedmoe.errors import ConfigError
from hfedmoe.importance import compute_batch_stats
from hfedmoe.lora import LoRASpec
from hfedmoe.models.base import MoEModel
from hfedmoe.names import ExpertId
from hfedmoe.precision import LowPrecisionFrozen
from hfedmoe.privacy import privatize
from hfedmoe.round_stats import RoundAccumulator, RoundStats
from hfedmoe.selection import Selection, rank_experts, selection_generator, selection_scores
from hfedmoe.signals import ranking_disagreement
from hfedmoe.strategies import Strategy
from hfedmoe.trainer import (
    DTYPES,
    EagerTrainer,
    StopTraining,
    Trainer,
    autocast_for,
    check_quantized,
    factor_seed,
    to_device,
)
from hfedmoe.update import SparseUpdate, UpdateMeta


def latency_summary(phases: Sequence[Mapping[str, float]], step_seconds: Sequence[float],
                    routing_s: float, peak_rss_mib: float | None = None,
                    device_peak_mib: float | None = None) -> dict[str, Any]:
    """The compact per-round timing summary a device sends with its update: per phase the
    median, p90 and total over the round's steps (seconds), the routing/selection pass, and
    peak memory. A field trial's latency table is built from these."""
    out: dict[str, Any] = {"steps": len(step_seconds), "routing_s": round(routing_s, 6)}
    series = {"step": list(step_seconds)}
    for name in ("forward", "backward", "optimizer"):
        vals = [p[name] for p in phases if name in p]
        if vals:
            series[name] = vals
    for name, vals in series.items():
        if vals:
            ordered = sorted(vals)
            out[name] = {"median": round(statistics.median(ordered), 6),
                         "p90": round(ordered[min(len(ordered) - 1,
                                                  int(0.9 * (len(ordered) - 1) + 0.5))], 6),
                         "total": round(sum(ordered), 6)}
    if peak_rss_mib is not None:
        out["peak_rss_mib"] = round(peak_rss_mib, 1)
    if device_peak_mib is not None:
        out["device_peak_mib"] = round(device_peak_mib, 1)
    return out


def _peak_memory(device: torch.device) -> tuple[float | None, float | None]:
    """(peak RSS of this process, peak CUDA allocation) in MiB, where they can be read."""
    rss = None
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except (ImportError, OSError):
        pass
    dev = (torch.cuda.max_memory_allocated(device) / 2**20
           if torch.device(device).type == "cuda" else None)
    return rss, dev


@dataclass
class RoundResult:
    """What one local round produced, besides the update itself (for logs and the report)."""

    update: SparseUpdate
    steps: int
    examples: int
    tokens: int
    losses: list[float]
    seconds: float
    stopped_by: str  # "data", "max_steps", "plan" or "deadline"
    budget: int
    selections: list[list[str]] = field(default_factory=list)
    selected: tuple[ExpertId, ...] = ()
    optimizer_experts: int = 0  # most experts holding optimizer state at any step
    routing_seconds: float = 0.0
    plan: dict[str, Any] | None = None

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / max(len(self.losses), 1)


def _batches(data: TextDataset | PairDataset, cfg: TrainConfig, seed: int,
             round_idx: int) -> Iterator[Any]:
    for epoch in range(cfg.local_epochs):
        yield from iter_minibatches(len(data), cfg.batch_size, seed=seed,
                                    epoch=round_idx * cfg.local_epochs + epoch)


def round_batches(data: TextDataset | PairDataset, cfg: TrainConfig, seed: int,
                  round_idx: int) -> list[Any]:
    """The round's minibatches of example indices, in training order (``max_steps`` applied)."""
    out = list(_batches(data, cfg, seed, round_idx))
    return out[: cfg.max_steps] if cfg.max_steps else out


def routing_pass(model: MoEModel, data: TextDataset | PairDataset, batches: Sequence[Any],
                 cfg: MethodConfig, train_cfg: TrainConfig, max_length: int,
                 pad_to_max_length: bool = False) -> RoundStats:
    """Round statistics from forwards without autograd over ``batches`` (Eq. 3-14 per batch,
    averaged; Eq. 16 usage; token rows per expert for the cost model)."""
    device = next(model.module.parameters()).device
    acc = RoundAccumulator()
    with torch.no_grad():
        for idx in batches:
            batch = to_device(collate(data, idx, model.tokenizer, max_length, pad_to_max_length),
                        device)
            mask = batch["attention_mask"]
            with autocast_for(train_cfg, device), model.capture(mask) as cap:
                model.module(input_ids=batch["input_ids"], attention_mask=mask)
            acc.add(compute_batch_stats(cap.scores, cap.routed, cfg), (),
                    expert_rows=cap.expert_rows, batch_rows=mask.numel())
    return acc.result()


def selection_sample(batches: Sequence[Any], n: int) -> list[Any]:
    """The routing pass's sample: the first ``n`` of the round's (shuffled) batches; 0: all."""
    return list(batches[:n]) if n else list(batches)


@dataclass(frozen=True)
class RoundIds:
    """Whose round this is: what the update is labelled with."""

    run_id: str = "local"
    round_idx: int = 0
    client_id: str = "client"
    base_hash: str = ""  # hash of the global model the deltas are relative to


@dataclass(frozen=True)
class RoundContext:
    """Everything one local round is given.

    Attributes:
        model: the client's copy of the global model (modified in place).
        data: the client's local examples.
        strategy: selection and aggregation rule (``hfedmoe.strategies.get_strategy``).
        budget: C_budget, the most experts this device trains, holds state for and sends in
            the round.
        train: the recipe (batch size, lr, optimizer, dtype, detach_frozen, epochs,
            selection_batches, reselect). With ``dtype`` bf16/fp16 and ``hold_frozen_lowp`` on
            the eager runtime the frozen matmul weights are stored in that dtype for the round
            (:class:`hfedmoe.precision.LowPrecisionFrozen`) and are back in fp32, unchanged,
            when it returns.
        method: overrides ``strategy.cfg`` (lam, beta, tau, DP).
        ids: run, round, client and base model hash the update is labelled with.
        max_length: tokens per example (the ExecuTorch program's static sequence length).
        assignment: the fixed sub-model for strategies that need one (fedmoe).
        deadline_s: stop before a step that would end past this many seconds.
        planner: ``planner(selection, routing_stats)`` returns a
            :class:`~device_agent.budget.RoundPlan` (experts to keep, steps); None keeps the
            selection and every step.
        on_step: called after every step with a dict of progress facts; may raise
            :class:`~hfedmoe.trainer.StopTraining` to end the round and send what trained.
        clock: injectable monotonic clock (tests).
        runtime: ``"eager"`` or ``"executorch"`` (the training program a phone runs).
        backend: ExecuTorch backend (``"portable"`` or ``"xnnpack"``).
        prior: the global routing prior u_global(e) the server announced (the selection's
            client-specificity term, ``method.specificity``); None: none yet.
        selection_data: the data the routing pass ranks experts on when the strategy reads
            another client's (the ``hfedmoe-other`` control); None: ``data``.
    """

    model: MoEModel
    data: TextDataset | PairDataset
    strategy: Strategy
    budget: int
    train: TrainConfig
    method: MethodConfig | None = None
    ids: RoundIds = RoundIds()
    max_length: int = 128
    assignment: frozenset[ExpertId] | None = None
    deadline_s: float | None = None
    planner: Callable[[Selection, RoundStats], Any] | None = None
    on_step: Callable[[dict[str, Any]], None] | None = None
    clock: Callable[[], float] = time.monotonic
    runtime: Literal["eager", "executorch"] = "eager"
    backend: str = "portable"
    prior: Mapping[ExpertId, float] | None = None
    selection_data: TextDataset | PairDataset | None = None

    def __post_init__(self) -> None:
        if self.runtime not in ("eager", "executorch"):
            raise ConfigError(f"runtime must be 'eager' or 'executorch', not {self.runtime!r}")

    @property
    def mcfg(self) -> MethodConfig:
        return self.method or self.strategy.cfg


@dataclass(frozen=True)
class _Runtime:
    """What the runtime fixes before the round: the batches it takes, its budget, reselection."""

    name: str
    budget: int  # the ExecuTorch runtime: the program bucket (<= C_budget)
    pad: bool  # every batch padded to max_length (a program's static shape)
    full_batches_only: bool  # batches shorter than batch_size dropped (static shape)
    per_batch: bool  # train.reselect = "batch"


@dataclass(frozen=True)
class _Choice:
    """The routing pass and the selection: the round's expert set and batches."""

    stats: RoundStats | None
    ranked: tuple[ExpertId, ...]
    batches: list[Any]
    stopped_by: str  # what ends the round if nothing else does: "data", "max_steps", "plan"
    routing_s: float
    disagreement: float = 0.0
    plan: Any = None


@dataclass
class _Progress:
    """What the loop has done so far."""

    stopped_by: str
    losses: list[float] = field(default_factory=list)
    selections: list[list[str]] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    examples: int = 0
    tokens: int = 0


class _NoTrainer:
    """The ExecuTorch runtime's round without experts or batches: nothing trains or is sent."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.active: frozenset[ExpertId] = frozenset()
        self.trained: set[ExpertId] = set()
        self.acc = RoundAccumulator()
        self.phases: list[dict[str, float]] = []
        self.max_state_experts = 0

    def set_active(self, experts: frozenset[ExpertId]) -> None:
        raise AssertionError("a round without a trainer has no steps")

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        raise AssertionError("a round without a trainer has no steps")

    def deltas(self) -> dict[str, torch.Tensor]:
        return {}


def train_round(ctx: RoundContext) -> RoundResult:
    """Fine-tune ``ctx.model`` on ``ctx.data`` for one round and return the sparse update:
    route, select (and plan), then one loop over the runtime's :class:`Trainer`.

    Returns:
        A :class:`RoundResult` whose ``update`` carries deltas of what trained.
    """
    check_quantized(ctx.model, ctx.train, ctx.runtime)
    train = ctx.train
    device = next(ctx.model.module.parameters()).device
    with training_kernels(train.dtype, device):  # as measure_costs measured (device_agent.heap)
        if train.dtype == "float32" or ctx.runtime != "eager" or not train.hold_frozen_lowp:
            return _run(ctx, None)
        with LowPrecisionFrozen(ctx.model.module, DTYPES[train.dtype]) as low:
            return _run(ctx, low)


def _run(ctx: RoundContext, low: LowPrecisionFrozen | None) -> RoundResult:
    """:func:`train_round` (``low``: the round's lowered frozen weights, or None)."""
    start = ctx.clock()
    rt = _runtime(ctx)
    choice = _choose(ctx, rt, start)
    batches = choice.batches
    trainer = _make_trainer(ctx, rt, choice.ranked, batches, low)
    if trainer is None:
        trainer, batches = _NoTrainer(), []
    progress = _loop(ctx, rt, trainer, batches, start, choice.stopped_by)
    deltas, noise_std = _privatize(ctx.mcfg, trainer.deltas())
    stats = trainer.acc.result() if trainer.acc.num_batches else choice.stats
    latency = latency_summary(trainer.phases, progress.step_seconds, choice.routing_s,
                              *_peak_memory(trainer.device))
    meta = _round_meta(ctx, rt, choice, progress, trainer.max_state_experts, latency, low,
                       noise_std, start)
    return _finish(ctx, choice, progress, deltas, stats, frozenset(trainer.trained),
                   trainer.max_state_experts, rt.budget, meta, start)


def _runtime(ctx: RoundContext) -> _Runtime:
    """Eager PyTorch, or the ExecuTorch program (a classifier or a causal LM): static batch
    shape, the budget rounded down to a program bucket, one expert set for the round."""
    if ctx.runtime == "eager":
        return _Runtime("eager", ctx.budget, pad=False, full_batches_only=False,
                        per_batch=ctx.train.reselect == "batch" and ctx.strategy.uses_budget)
    check_task(ctx.model)
    return _Runtime("executorch", bucket_for(ctx.budget) if ctx.budget else 0, pad=True,
                    full_batches_only=True, per_batch=False)


def _choose(ctx: RoundContext, rt: _Runtime, start: float) -> _Choice:
    """Route a sample of the round's batches, select E_active within the budget, plan."""
    mcfg, cfg = ctx.mcfg, ctx.train
    available = [b for b in _batches(ctx.data, cfg, mcfg.seed, ctx.ids.round_idx)
                 if not rt.full_batches_only or len(b) == cfg.batch_size]
    batches = available[: cfg.max_steps] if cfg.max_steps else available
    cut = "max_steps" if len(batches) < len(available) else "data"
    if not batches:
        return _Choice(None, (), batches, cut, ctx.clock() - start)
    stats = _routing_stats(ctx, rt, batches)
    routing_s = ctx.clock() - start
    generator = (selection_generator(mcfg.seed, ctx.ids.client_id, ctx.ids.round_idx)
                 if ctx.strategy.needs_generator else None)
    selection = ctx.strategy.select(stats, rt.budget, generator=generator,
                                    assignment=ctx.assignment, prior=ctx.prior)
    ranked = tuple(selection.ranked())
    disagreement = ranking_disagreement(stats.scores("ib"), stats.scores("importance"),
                                        rt.budget)
    plan = ctx.planner(selection, stats) if ctx.planner is not None else None
    if plan is not None:
        ranked = tuple(plan.experts)
        if plan.steps < len(batches):
            batches, cut = batches[: plan.steps], "plan"
    return _Choice(stats, ranked, batches, cut, routing_s, disagreement, plan)


def _routing_stats(ctx: RoundContext, rt: _Runtime, batches: Sequence[Any]) -> RoundStats:
    """The routing pass over a sample of the round's batches (of another client's data when the
    strategy ranks on that, as many batches)."""
    mcfg, cfg = ctx.mcfg, ctx.train
    sample = selection_sample(batches, cfg.selection_batches)
    data = ctx.data
    if ctx.strategy.other_data:
        if ctx.selection_data is None or not len(ctx.selection_data):
            raise ConfigError(f"strategy {ctx.strategy.name} ranks experts on another client's "
                              "data: only the simulator can give a device that")
        data = ctx.selection_data
        sample = selection_sample(round_batches(data, cfg, mcfg.seed, ctx.ids.round_idx),
                                  len(sample))
    return routing_pass(ctx.model, data, sample, mcfg, cfg, ctx.max_length,
                        pad_to_max_length=rt.pad)


def _make_trainer(ctx: RoundContext, rt: _Runtime, ranked: Sequence[ExpertId],
                  batches: Sequence[Any], low: LowPrecisionFrozen | None) -> Trainer | None:
    """The runtime's trainer of ``ranked`` (per-batch reselection: of none yet).

    The ExecuTorch program trains with its SGD on batches padded to its static shape; with
    ``train.adapter = "lora"`` the LoRA program trains factors of the set (sent as factors;
    the device keeps its base expert weights, as on the eager runtime); with
    ``train.executorch_capacity_factor`` its experts run the ``"capacity"`` path
    (:mod:`export.runtime`). None: nothing to train on that runtime."""
    cfg = ctx.train
    seed = factor_seed(ctx.mcfg, ctx.ids.round_idx, ctx.ids.client_id)
    if rt.name == "executorch":
        if not (ranked and batches):
            return None
        if cfg.adapter == "lora" and ctx.model.lora_bases:
            raise ConfigError(
                f"the ExecuTorch training programs put LoRA factors on the experts only, but "
                f"{ctx.model.family} has {len(ctx.model.lora_bases)} more LoRA bases (shared "
                f"experts, model.lora_targets) that must not train in full: use the eager "
                f"runtime")
        lora = LoRASpec(cfg.lora_rank, cfg.lora_alpha) if cfg.adapter == "lora" else None
        return ExecuTorchTrainer(ctx.model, sorted(ranked), (cfg.batch_size, ctx.max_length),
                                 cfg.lr, bucket=rt.budget, backend=ctx.backend, lora=lora,
                                 seed=seed, capacity_factor=cfg.executorch_capacity_factor,
                                 write_back=True)
    for layer in ctx.model.layers:
        layer.bank.detach_frozen = cfg.detach_frozen
    return EagerTrainer(ctx.model, [] if rt.per_batch else list(ranked), cfg, ctx.mcfg,
                        seed=seed, low=low)


def _loop(ctx: RoundContext, rt: _Runtime, trainer: Trainer, batches: Sequence[Any],
          start: float, stopped_by: str) -> _Progress:
    """One step per batch until the batches end, the deadline nears or ``on_step`` stops it."""
    done = _Progress(stopped_by)
    union: set[ExpertId] = set()
    step_time = 0.0  # smoothed: the deadline check's estimate of the next step
    for idx in batches:
        if (ctx.deadline_s is not None and done.losses
                and ctx.clock() - start + step_time > ctx.deadline_s):
            done.stopped_by = "deadline"
            break
        t0 = ctx.clock()
        batch = collate(ctx.data, idx, ctx.model.tokenizer, ctx.max_length, rt.pad)
        if rt.per_batch:
            trainer.set_active(_reselect(ctx, rt.budget, batch, union, trainer.device))
            union |= trainer.active
        done.losses.append(trainer.step(batch))
        after_step()  # the heap pages the step freed go back (device_agent.heap)
        done.selections.append(sorted(str(e) for e in trainer.active))
        done.examples += len(idx)
        done.tokens += int(batch["attention_mask"].sum())
        dt = ctx.clock() - t0
        done.step_seconds.append(dt)
        step_time = dt if len(done.losses) == 1 else 0.8 * step_time + 0.2 * dt
        if not _report_step(ctx, done, len(trainer.active), rt.budget, batch, dt, start):
            done.stopped_by = "conditions"
            break
    return done


def _report_step(ctx: RoundContext, done: _Progress, experts: int, budget: int,
                 batch: dict[str, torch.Tensor], dt: float, start: float) -> bool:
    """Tell ``on_step`` the step's facts; False when it asks the round to stop."""
    if ctx.on_step is None:
        return True
    try:
        ctx.on_step({"step": len(done.losses), "loss": done.losses[-1], "experts": experts,
                     "budget": budget, "tokens_per_s": int(batch["attention_mask"].sum())
                     / max(dt, 1e-9), "elapsed": ctx.clock() - start})
    except StopTraining:
        return False
    return True


def _reselect(ctx: RoundContext, budget: int, batch: dict[str, torch.Tensor],
              union: set[ExpertId], device: torch.device) -> frozenset[ExpertId]:
    """Per-batch Eq. 15 within C_budget for the round: once ``budget`` distinct experts have
    trained, only they stay candidates."""
    model, mcfg = ctx.model, ctx.mcfg
    with torch.no_grad(), autocast_for(ctx.train, device), \
            model.capture(batch["attention_mask"].to(device)) as cap:
        model.module(input_ids=batch["input_ids"].to(device),
                     attention_mask=batch["attention_mask"].to(device))
    stats = compute_batch_stats(cap.scores, cap.routed, mcfg)
    scores = selection_scores(stats, mcfg, ctx.prior)
    chosen: list[ExpertId] = []
    for e in rank_experts(scores):
        if len(chosen) >= budget:
            break
        if e in union or len(union | set(chosen)) < budget:
            chosen.append(e)
    return frozenset(chosen)


def _round_meta(ctx: RoundContext, rt: _Runtime, choice: _Choice, done: _Progress,
                state_experts: int, latency: dict[str, Any], low: LowPrecisionFrozen | None,
                dp_noise_std: float | None, start: float) -> UpdateMeta:
    """The update's ``meta``: what the round held (budget, plan, experts with optimizer
    state), how it ended, its latency, and what the runtime ran."""
    cfg = ctx.train
    executorch = rt.name == "executorch"
    return UpdateMeta(
        loss=sum(done.losses) / max(len(done.losses), 1), steps=len(done.losses),
        stopped_by=done.stopped_by, budget=rt.budget, seconds=ctx.clock() - start,
        examples_processed=done.examples, selected=len(choice.ranked),
        optimizer_experts=state_experts, routing_s=choice.routing_s, runtime=rt.name,
        ib_vs_importance=choice.disagreement, latency=latency,
        bucket=rt.budget if executorch else None,
        capacity_factor=cfg.executorch_capacity_factor if executorch else None,
        reselect=None if executorch else cfg.reselect,
        # the dtype the frozen matmul weights were held in
        frozen_dtype=None if executorch else (
            cfg.dtype if low is not None and low.lowered_total else "float32"),
        plan=choice.plan.to_dict() if choice.plan is not None else None,
        dp_noise_std=dp_noise_std,
        dp_clip=ctx.mcfg.dp_clip if dp_noise_std is not None else None,
        dp_noise_multiplier=ctx.mcfg.dp_noise_multiplier if dp_noise_std is not None else None)


def _privatize(mcfg: MethodConfig, deltas: dict[str, torch.Tensor]
               ) -> tuple[dict[str, torch.Tensor], float | None]:
    """Clipped and noised deltas when DP is configured, and the noise's std (else None).
    The noise comes from the OS's randomness; the norm and the clip factor stay on the
    device."""
    if mcfg.dp_clip <= 0 or not deltas:
        return deltas, None
    private = privatize(deltas, mcfg.dp_clip, mcfg.dp_noise_multiplier)
    return dict(private.deltas), private.noise_std


def _finish(ctx: RoundContext, choice: _Choice, done: _Progress,
            deltas: dict[str, torch.Tensor], stats: RoundStats | None,
            updated: frozenset[ExpertId], state_experts: int, budget: int,
            meta: UpdateMeta, start: float) -> RoundResult:
    """The sparse update and the round's result."""
    ids = ctx.ids
    update = SparseUpdate(
        run_id=ids.run_id, round_idx=ids.round_idx, client_id=ids.client_id,
        num_examples=max(len(ctx.data), 1), deltas=deltas,
        usage=dict(stats.usage) if stats else {},
        importance=dict(stats.importance) if stats else {},
        routed=stats.routed if stats else frozenset(), updated=updated,
        base_model_hash=ids.base_hash, meta=meta)
    return RoundResult(update, len(done.losses), done.examples, done.tokens, done.losses,
                       ctx.clock() - start, done.stopped_by, budget, done.selections,
                       choice.ranked, state_experts, choice.routing_s,
                       choice.plan.to_dict() if choice.plan is not None else None)


def usage_profile(model: MoEModel, data: TextDataset | PairDataset, strategy: Strategy,
                  batch_size: int, max_length: int) -> dict[ExpertId, float]:
    """How often each expert is routed to on a device's data (the share of routing slots),
    from forward passes only: FedMoE's (Mei et al. 2024) activation frequency, which its fixed
    sub-model is chosen by."""
    acc = RoundAccumulator()
    with torch.no_grad():
        for idx in iter_minibatches(len(data), batch_size, shuffle=False):
            batch = collate(data, idx, model.tokenizer, max_length)
            with model.capture(batch["attention_mask"]) as cap:
                model.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            acc.add(compute_batch_stats(cap.scores, cap.routed, strategy.cfg))
    return dict(acc.result().frequency)
