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
3. **Train.** A trainer (eager PyTorch, or the ExecuTorch program a phone runs) trains exactly
   that set, the gates and the shared parts for every step of the round: other experts get no
   gradient and no optimizer state. There is no routing pass per step: usage u_c(e) (Eq. 16)
   and importance for the update come from the training forwards' own gate capture (the
   ExecuTorch program does not expose its gates, so there they come from the routing pass).

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
from typing import Any

import torch

from hfedmoe.config import MethodConfig, TrainConfig
from hfedmoe.data import PairDataset, TextDataset, collate, iter_minibatches
from hfedmoe.importance import compute_batch_stats
from hfedmoe.lora import LoRASpec
from hfedmoe.models.base import MoEModel
from hfedmoe.names import ExpertId
from hfedmoe.precision import LowPrecisionFrozen
from hfedmoe.privacy import privatize
from hfedmoe.round_stats import RoundAccumulator, RoundStats
from hfedmoe.selection import Selection, rank_experts, selection_generator
from hfedmoe.signals import ranking_disagreement
from hfedmoe.strategies import Strategy
from hfedmoe.trainer import (
    DTYPES,
    EagerTrainer,
    StopTraining,
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


def _select(strategy: Strategy, stats: RoundStats, budget: int, mcfg: MethodConfig,
            client_id: str, round_idx: int,
            assignment: frozenset[ExpertId] | None) -> Selection:
    generator = (selection_generator(mcfg.seed, client_id, round_idx)
                 if strategy.needs_generator else None)
    return strategy.select(stats, budget, generator=generator, assignment=assignment)


def train_round(model: MoEModel, data: TextDataset | PairDataset, *, strategy: Strategy,
                budget: int, train_cfg: TrainConfig, method_cfg: MethodConfig | None = None,
                run_id: str = "local", round_idx: int = 0, client_id: str = "client",
                max_length: int = 128, deadline_s: float | None = None,
                assignment: frozenset[ExpertId] | None = None, base_hash: str = "",
                clock: Callable[[], float] = time.monotonic,
                on_step: Callable[[dict[str, Any]], None] | None = None,
                planner: Callable[[Selection, RoundStats], Any] | None = None,
                runtime: str = "eager", backend: str = "portable") -> RoundResult:
    """Fine-tune ``model`` on ``data`` for one round and return the sparse update.

    Args:
        model: the client's copy of the global model (modified in place).
        data: the client's local examples.
        strategy: selection and aggregation rule (``hfedmoe.strategies.get_strategy``).
        budget: C_budget, the most experts this device trains, holds state for and sends in
            the round.
        train_cfg: the recipe (batch size, lr, optimizer, dtype, detach_frozen, epochs,
            selection_batches, reselect). With ``dtype`` bf16/fp16 and ``hold_frozen_lowp`` on
            the eager runtime the frozen matmul weights are stored in that dtype for the round
            (:class:`hfedmoe.precision.LowPrecisionFrozen`) and are back in fp32, unchanged,
            when it returns.
        method_cfg: overrides ``strategy.cfg`` (lam, beta, tau, DP).
        deadline_s: stop before a step that would end past this many seconds.
        assignment: the fixed sub-model for strategies that need one (fedmoe).
        base_hash: hash of the global model the deltas are relative to.
        clock: injectable monotonic clock (tests).
        on_step: called after every step with a dict of progress facts.
        planner: ``planner(selection, routing_stats)`` returns a
            :class:`~device_agent.budget.RoundPlan` (experts to keep, steps); None keeps the
            selection and every step.
        runtime: ``"eager"`` or ``"executorch"`` (the training program a phone runs).
        backend: ExecuTorch backend (``"portable"`` or ``"xnnpack"``).

    Returns:
        A :class:`RoundResult` whose ``update`` carries deltas of what trained.
    """
    kwargs = dict(strategy=strategy, budget=budget, train_cfg=train_cfg, method_cfg=method_cfg,
                  run_id=run_id, round_idx=round_idx, client_id=client_id,
                  max_length=max_length, deadline_s=deadline_s, assignment=assignment,
                  base_hash=base_hash, clock=clock, on_step=on_step, planner=planner,
                  runtime=runtime, backend=backend)
    if train_cfg.dtype == "float32" or runtime != "eager" or not train_cfg.hold_frozen_lowp:
        return _train_round(model, data, **kwargs)  # type: ignore[arg-type]
    with LowPrecisionFrozen(model.module, DTYPES[train_cfg.dtype]) as low:
        return _train_round(model, data, low=low, **kwargs)  # type: ignore[arg-type]


def _train_round(model: MoEModel, data: TextDataset | PairDataset, *, strategy: Strategy,
                budget: int, train_cfg: TrainConfig, method_cfg: MethodConfig | None = None,
                run_id: str = "local", round_idx: int = 0, client_id: str = "client",
                max_length: int = 128, deadline_s: float | None = None,
                assignment: frozenset[ExpertId] | None = None, base_hash: str = "",
                clock: Callable[[], float] = time.monotonic,
                on_step: Callable[[dict[str, Any]], None] | None = None,
                planner: Callable[[Selection, RoundStats], Any] | None = None,
                runtime: str = "eager", backend: str = "portable",
                 low: LowPrecisionFrozen | None = None) -> RoundResult:
    """:func:`train_round` (``low``: the round's lowered frozen weights, or None)."""
    mcfg = method_cfg or strategy.cfg
    check_quantized(model, train_cfg, runtime)
    start = clock()
    batches = round_batches(data, train_cfg, mcfg.seed, round_idx)
    executorch = runtime == "executorch"
    if executorch:
        if model.task != "classification":
            raise ValueError("ExecuTorch training programs support classification models only")
        from export.programs import bucket_for

        batches = [b for b in batches if len(b) == train_cfg.batch_size]  # static shape
        budget = bucket_for(budget) if budget else 0
    stats = routing_pass(model, data, selection_sample(batches, train_cfg.selection_batches),
                         mcfg, train_cfg, max_length, pad_to_max_length=executorch) \
        if batches else None
    routing_s = clock() - start
    selection = (_select(strategy, stats, budget, mcfg, client_id, round_idx, assignment)
                 if stats is not None else Selection(frozenset()))
    ranked = list(selection.ranked())
    disagreement = (ranking_disagreement(stats.scores("ib"), stats.scores("importance"), budget)
                    if stats is not None else 0.0)
    plan = planner(selection, stats) if planner is not None and stats is not None else None
    if plan is not None:
        ranked = list(plan.experts)
        if plan.steps < len(batches):
            batches = batches[: plan.steps]
    if executorch:
        return _train_executorch(model, data, batches, ranked, stats, budget, train_cfg, mcfg,
                                 run_id, round_idx, client_id, max_length, deadline_s,
                                 base_hash, clock, start, backend, plan, routing_s,
                                 disagreement)
    for layer in model.layers:
        layer.bank.detach_frozen = train_cfg.detach_frozen
    per_batch = train_cfg.reselect == "batch" and strategy.uses_budget
    trainer = EagerTrainer(model, [] if per_batch else ranked, train_cfg, mcfg,
                           seed=factor_seed(mcfg, round_idx, client_id), low=low)
    union: set[ExpertId] = set()
    losses: list[float] = []
    selections: list[list[str]] = []
    examples = tokens = 0
    available = list(_batches(data, train_cfg, mcfg.seed, round_idx))
    stopped_by = ("plan" if len(batches) < min(len(available), train_cfg.max_steps or 10**9)
                  else "max_steps" if len(batches) < len(available) else "data")
    step_time = 0.0
    step_seconds: list[float] = []
    device = trainer.device
    for idx in batches:
        if deadline_s is not None and losses and clock() - start + step_time > deadline_s:
            stopped_by = "deadline"
            break
        t0 = clock()
        batch = collate(data, idx, model.tokenizer, max_length)
        step_seconds.append(0.0)
        if per_batch:
            trainer.set_active(_reselect(model, batch, strategy, budget, mcfg, train_cfg,
                                         union, device))
            union |= trainer.active
        losses.append(trainer.step(batch))
        selections.append(sorted(str(e) for e in trainer.active))
        examples += len(idx)
        tokens += int(batch["attention_mask"].sum())
        dt = clock() - t0
        step_seconds[-1] = dt
        step_time = dt if len(losses) == 1 else 0.8 * step_time + 0.2 * dt  # smoothed
        if on_step is not None:
            try:
                on_step({"step": len(losses), "loss": losses[-1], "experts": len(trainer.active),
                         "budget": budget, "tokens_per_s": int(batch["attention_mask"].sum())
                         / max(dt, 1e-9), "elapsed": clock() - start})
            except StopTraining:
                stopped_by = "conditions"
                break
    deltas = trainer.deltas()
    train_stats = trainer.acc.result() if trainer.acc.num_batches else stats
    updated = frozenset(trainer.trained)
    latency = latency_summary(trainer.phases, step_seconds[:len(losses)], routing_s,
                              *_peak_memory(device))
    return _finish(model, deltas, train_stats, updated, len(data), examples, tokens, losses,
                   selections, stopped_by, budget, mcfg, run_id, round_idx, client_id,
                   base_hash, clock, start, tuple(ranked), trainer.max_state_experts,
                   routing_s, plan, {"runtime": "eager", "reselect": train_cfg.reselect,
                                     "ib_vs_importance": disagreement, "latency": latency,
                                     # the dtype the frozen matmul weights were held in
                                     "frozen_dtype": train_cfg.dtype if low is not None
                                     and low.lowered_total else "float32"})


def _reselect(model: MoEModel, batch: dict[str, torch.Tensor], strategy: Strategy, budget: int,
              mcfg: MethodConfig, train_cfg: TrainConfig, union: set[ExpertId],
              device: torch.device) -> frozenset[ExpertId]:
    """Per-batch Eq. 15 within C_budget for the round: once ``budget`` distinct experts have
    trained, only they stay candidates."""
    with torch.no_grad(), autocast_for(train_cfg, device), \
            model.capture(batch["attention_mask"].to(device)) as cap:
        model.module(input_ids=batch["input_ids"].to(device),
                     attention_mask=batch["attention_mask"].to(device))
    stats = compute_batch_stats(cap.scores, cap.routed, mcfg)
    scores = stats.scores(mcfg.selection_key)
    chosen: list[ExpertId] = []
    for e in rank_experts(scores):
        if len(chosen) >= budget:
            break
        if e in union or len(union | set(chosen)) < budget:
            chosen.append(e)
    return frozenset(chosen)


def _train_executorch(model: MoEModel, data: TextDataset | PairDataset, batches: list[Any],
                      ranked: list[ExpertId], stats: RoundStats | None, bucket: int,
                      train_cfg: TrainConfig, mcfg: MethodConfig, run_id: str, round_idx: int,
                      client_id: str, max_length: int, deadline_s: float | None,
                      base_hash: str, clock: Callable[[], float], start: float, backend: str,
                      plan: Any, routing_s: float, disagreement: float = 0.0) -> RoundResult:
    """The ExecuTorch trainer on the round's expert set: batches padded to the program's static
    shape, the program's SGD. Usage and importance come from the routing pass. With
    ``train.adapter = "lora"`` the LoRA program trains factors of the set (sent as factors; the
    device keeps its base expert weights, as on the eager runtime). With
    ``train.executorch_capacity_factor`` the program's experts run the ``"capacity"`` path
    (:mod:`export.runtime`) instead of ``"dense"``."""
    from export.runtime import ExecuTorchTrainer
    from hfedmoe.lora import split_factor_key

    lora = (LoRASpec(train_cfg.lora_rank, train_cfg.lora_alpha)
            if train_cfg.adapter == "lora" else None)

    chosen = sorted(ranked)
    encoded = [collate(data, idx, model.tokenizer, max_length, pad_to_max_length=True)
               for idx in batches]
    losses: list[float] = []
    step_seconds: list[float] = []
    stopped_by = "data"
    deltas: dict[str, torch.Tensor] = {}
    if chosen and encoded:
        trainer = ExecuTorchTrainer(model, chosen, (train_cfg.batch_size, max_length),
                                    train_cfg.lr, bucket=bucket, backend=backend, lora=lora,
                                    seed=factor_seed(mcfg, round_idx, client_id),
                                    capacity_factor=train_cfg.executorch_capacity_factor)
        step_time = 0.0
        for batch in encoded:
            if deadline_s is not None and losses and clock() - start + step_time > deadline_s:
                stopped_by = "deadline"
                break
            t0 = clock()
            losses.append(trainer.step(batch))
            step_time = clock() - t0
            step_seconds.append(step_time)
        deltas = trainer.deltas()
        model.load_state({k: model.parameter(k).detach() + d for k, d in deltas.items()
                           if split_factor_key(k) is None})
    updated = frozenset(chosen) if losses else frozenset()
    tokens = sum(int(b["attention_mask"].sum()) for b in encoded[:len(losses)])
    extra: dict[str, Any] = {"runtime": "executorch", "bucket": bucket,
                             "ib_vs_importance": disagreement,
                             "latency": latency_summary([], step_seconds, routing_s,
                                                        *_peak_memory(torch.device("cpu")))}
    if train_cfg.executorch_capacity_factor is not None:
        extra["capacity_factor"] = train_cfg.executorch_capacity_factor
    return _finish(model, deltas, stats, updated, len(data), len(losses) * train_cfg.batch_size,
                   tokens, losses, [sorted(map(str, chosen))] * len(losses), stopped_by, bucket,
                   mcfg, run_id, round_idx, client_id, base_hash, clock, start, tuple(ranked),
                   len(updated), routing_s, plan, extra)


def _finish(model: MoEModel, deltas: dict[str, torch.Tensor], stats: RoundStats | None,
            updated: frozenset[ExpertId], num_examples: int, examples: int, tokens: int,
            losses: list[float], selections: list[list[str]], stopped_by: str, budget: int,
            mcfg: MethodConfig, run_id: str, round_idx: int, client_id: str, base_hash: str,
            clock: Callable[[], float], start: float, selected: tuple[ExpertId, ...],
            state_experts: int, routing_s: float, plan: Any,
            extra: dict[str, Any]) -> RoundResult:
    meta = UpdateMeta(loss=sum(losses) / max(len(losses), 1), steps=len(losses),
                      stopped_by=stopped_by, budget=budget, seconds=clock() - start,
                      examples_processed=examples, selected=len(selected),
                      optimizer_experts=state_experts, routing_s=routing_s,
                      plan=plan.to_dict() if plan is not None else None, **extra)
    if mcfg.dp_clip > 0 and deltas:
        # noise from the OS's randomness; the norm and the clip factor stay on the device
        private = privatize(deltas, mcfg.dp_clip, mcfg.dp_noise_multiplier)
        deltas = dict(private.deltas)
        meta = meta.replace(dp_noise_std=private.noise_std, dp_clip=mcfg.dp_clip)
    update = SparseUpdate(
        run_id=run_id, round_idx=round_idx, client_id=client_id,
        num_examples=max(num_examples, 1), deltas=deltas,
        usage=dict(stats.usage) if stats else {},
        importance=dict(stats.importance) if stats else {},
        routed=stats.routed if stats else frozenset(), updated=updated,
        base_model_hash=base_hash, meta=meta)
    return RoundResult(update, len(losses), examples, tokens, losses, clock() - start,
                       stopped_by, budget, selections, selected, state_experts, routing_s,
                       plan.to_dict() if plan is not None else None)


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
