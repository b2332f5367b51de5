"""The local fine-tuning recipe: one client's round of HFedMoE training.

Per batch (METHOD.md sections 1-3):

1. **Route.** A forward pass without autograd captures the gate scores G_e(x) of every real
   token at every MoE layer; the core computes s_b, KL_b and I_b (Eq. 3-14).
2. **Select.** The strategy picks E_active within C_budget (Eq. 15); fedavg-full takes every
   expert, fedmoe its fixed sub-model, fedavg-random a seeded random subset.
3. **Train.** Only E_active experts, the gates and the shared parts require gradients: frozen
   experts compute no weight gradient and hold no optimizer state (per-expert parameters), and
   with ``train.detach_frozen`` they also save no activations. The forward keeps normal top-k
   routing for every token.

The routing pass costs one extra forward without autograd per batch (about a third of a training
step); it is what lets selection use the batch's own statistics before any gradient is built.

After the round the client's :class:`~hfedmoe.update.SparseUpdate` holds deltas of exactly the
experts it updated plus gates and shared parts, the usage u_c(e) (Eq. 16), the mean importance
s^c(e) and the routed/updated sets.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from hfedmoe.config import MethodConfig, TrainConfig
from hfedmoe.data import PairDataset, TextDataset, collate, iter_minibatches
from hfedmoe.importance import compute_batch_stats
from hfedmoe.models.base import MoEModel
from hfedmoe.names import ExpertId, parse_key
from hfedmoe.privacy import privatize
from hfedmoe.round_stats import RoundAccumulator
from hfedmoe.selection import selection_generator
from hfedmoe.strategies import Strategy
from hfedmoe.update import SparseUpdate

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RoundResult:
    """What one local round produced, besides the update itself (for logs and the report)."""

    update: SparseUpdate
    steps: int
    examples: int
    tokens: int
    losses: list[float]
    seconds: float
    stopped_by: str  # "data", "max_steps" or "deadline"
    budget: int
    selections: list[list[str]] = field(default_factory=list)

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / max(len(self.losses), 1)


def make_optimizer(params: dict[str, torch.nn.Parameter], cfg: TrainConfig
                   ) -> torch.optim.Optimizer:
    """AdamW (default) or SGD over every parameter that may train this round.

    Parameters whose ``.grad`` is None in a step (frozen experts) are skipped by both: they get
    no update and no optimizer state. The fused kernels are used where torch has them (CPU and
    CUDA floating-point parameters): one pass per tensor instead of the foreach path's
    temporaries, which on CPU made AdamW's step ~7x slower and doubled its transient memory
    (``benchmarks/kernels.py``).
    """
    plist = list(params.values())
    fused = bool(plist) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                                for p in plist)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(plist, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               fused=fused or None)
    return torch.optim.AdamW(plist, lr=cfg.lr, weight_decay=cfg.weight_decay,
                             fused=fused or None)


def autocast_for(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on the device when configured; master weights stay fp32."""
    if cfg.dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[cfg.dtype])


def _batches(data: TextDataset | PairDataset, cfg: TrainConfig, seed: int,
             round_idx: int) -> Iterator[Any]:
    for epoch in range(cfg.local_epochs):
        yield from iter_minibatches(len(data), cfg.batch_size, seed=seed,
                                    epoch=round_idx * cfg.local_epochs + epoch)


def train_round(model: MoEModel, data: TextDataset | PairDataset, *, strategy: Strategy,
                budget: int, train_cfg: TrainConfig, method_cfg: MethodConfig | None = None,
                run_id: str = "local", round_idx: int = 0, client_id: str = "client",
                max_length: int = 128, deadline_s: float | None = None,
                assignment: frozenset[ExpertId] | None = None, base_hash: str = "",
                clock: Callable[[], float] = time.monotonic,
                on_step: Callable[[dict[str, Any]], None] | None = None) -> RoundResult:
    """Fine-tune ``model`` on ``data`` for one round and return the sparse update.

    Args:
        model: the client's copy of the global model (modified in place).
        data: the client's local examples.
        strategy: selection and aggregation rule (``hfedmoe.strategies.get_strategy``).
        budget: C_budget, the experts this device can train per batch.
        train_cfg: the recipe (batch size, lr, optimizer, dtype, detach_frozen, epochs).
        method_cfg: overrides ``strategy.cfg`` (lam, beta, tau, DP).
        deadline_s: stop before a step that would end past this many seconds.
        assignment: the fixed sub-model for strategies that need one (fedmoe).
        base_hash: hash of the global model the deltas are relative to.
        clock: injectable monotonic clock (tests).
        on_step: called after every step with a dict of progress facts.

    Returns:
        A :class:`RoundResult` whose ``update`` carries deltas of what trained.
    """
    mcfg = method_cfg or strategy.cfg
    tokenizer = model.tokenizer
    device = next(model.module.parameters()).device
    initial = model.state()
    trainable_all = {k: model.parameter(k) for k in model.keys()}  # frozen ones get no grad
    optimizer = make_optimizer(trainable_all, train_cfg)
    for layer in model.layers:
        layer.bank.detach_frozen = train_cfg.detach_frozen
    generator = (selection_generator(mcfg.seed, client_id, round_idx)
                 if strategy.needs_generator else None)
    acc = RoundAccumulator()
    losses: list[float] = []
    selections: list[list[str]] = []
    steps = examples = tokens = 0
    stopped_by = "data"
    start = clock()
    step_time = 0.0
    for idx in _batches(data, train_cfg, mcfg.seed, round_idx):
        if train_cfg.max_steps and steps >= train_cfg.max_steps:
            stopped_by = "max_steps"
            break
        elapsed = clock() - start
        if deadline_s is not None and steps and elapsed + step_time > deadline_s:
            stopped_by = "deadline"
            break
        t0 = clock()
        batch = {k: v.to(device) for k, v in collate(data, idx, tokenizer, max_length).items()}
        mask = batch["attention_mask"]
        with torch.no_grad(), autocast_for(train_cfg, device), model.capture(mask) as cap:
            model.module(**{k: v for k, v in batch.items() if k != "labels"})
        stats = compute_batch_stats(cap.scores, cap.routed, mcfg)
        selection = strategy.select(stats, budget, generator=generator, assignment=assignment)
        active = selection.experts & stats.routed  # an expert no token reached gets no gradient
        model.set_trainable(active)
        with autocast_for(train_cfg, device):
            loss = model.module(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        acc.add(stats, active)
        losses.append(float(loss.detach()))
        selections.append(sorted(str(e) for e in active))
        steps += 1
        examples += len(idx)
        tokens += int(mask.sum())
        dt = clock() - t0
        step_time = dt if steps == 1 else 0.8 * step_time + 0.2 * dt  # smoothed step time
        if on_step is not None:
            on_step({"step": steps, "loss": losses[-1], "experts": len(active),
                     "budget": budget, "tokens_per_s": int(mask.sum()) / max(dt, 1e-9),
                     "elapsed": clock() - start})
    model.set_trainable(())
    stats_round = acc.result() if acc.num_batches else None
    deltas = _deltas(model, initial, stats_round.updated if stats_round else frozenset(),
                     trained_any=steps > 0)
    meta: dict[str, Any] = {"loss": sum(losses) / max(len(losses), 1), "steps": steps,
                            "stopped_by": stopped_by, "budget": budget,
                            "seconds": clock() - start}
    if mcfg.dp_clip > 0 and deltas:
        private = privatize(deltas, mcfg.dp_clip, mcfg.dp_noise_multiplier,
                            selection_generator(mcfg.seed + 1, client_id, round_idx))
        deltas = dict(private.deltas)
        meta.update(dp_norm=private.norm, dp_scale=private.scale, dp_noise_std=private.noise_std)
    update = SparseUpdate(
        run_id=run_id, round_idx=round_idx, client_id=client_id, num_examples=max(examples, 1),
        deltas=deltas,
        usage=dict(stats_round.usage) if stats_round else {},
        importance=dict(stats_round.importance) if stats_round else {},
        routed=stats_round.routed if stats_round else frozenset(),
        updated=stats_round.updated if stats_round else frozenset(),
        base_model_hash=base_hash, meta=meta)
    return RoundResult(update, steps, examples, tokens, losses, clock() - start, stopped_by,
                       budget, selections)


def _deltas(model: MoEModel, initial: dict[str, torch.Tensor], updated: frozenset[ExpertId],
            trained_any: bool) -> dict[str, torch.Tensor]:
    """trained - initial for the updated experts, and for gates/shared parts if any step ran."""
    out = {}
    current = model.state()
    for key, value in current.items():
        pk = parse_key(key)
        if pk.kind == "expert" and pk.expert not in updated:
            continue
        if pk.kind != "expert" and not trained_any:
            continue
        out[key] = value - initial[key]
    return out


def usage_profile(model: MoEModel, data: TextDataset | PairDataset, strategy: Strategy,
                  batch_size: int, max_length: int) -> dict[ExpertId, float]:
    """u_c(e) (Eq. 16) of a device's data from forward passes only (fedmoe's assignment)."""
    acc = RoundAccumulator()
    with torch.no_grad():
        for idx in iter_minibatches(len(data), batch_size, shuffle=False):
            batch = collate(data, idx, model.tokenizer, max_length)
            with model.capture(batch["attention_mask"]) as cap:
                model.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            acc.add(compute_batch_stats(cap.scores, cap.routed, strategy.cfg))
    return dict(acc.result().usage)


def train_round_executorch(model: MoEModel, data: TextDataset | PairDataset, *,
                           strategy: Strategy, budget: int, train_cfg: TrainConfig,
                           method_cfg: MethodConfig | None = None, run_id: str = "local",
                           round_idx: int = 0, client_id: str = "client",
                           max_length: int = 128, deadline_s: float | None = None,
                           assignment: frozenset[ExpertId] | None = None,
                           base_hash: str = "", backend: str = "portable",
                           clock: Callable[[], float] = time.monotonic) -> RoundResult:
    """One round with the ExecuTorch runtime, as a phone runs it (classification only).

    A training program's trainable expert slots are fixed for the program instance, so the
    expert set is chosen once per round: a routing pass over the local data applies the
    strategy's per-batch selection (Eq. 15 for HFedMoE) to every batch, and the round trains
    the experts selected most often, up to the program bucket below C_budget
    (:func:`export.programs.bucket_for`). Every batch is padded to (batch_size, max_length),
    the program's static shape; the optimizer is the program's SGD. The update has the same
    format as the eager recipe's.
    """
    from collections import Counter

    from export.programs import bucket_for
    from export.runtime import ExecuTorchTrainer

    if model.task != "classification":
        raise ValueError("ExecuTorch training programs support classification models only")
    mcfg = method_cfg or strategy.cfg
    start = clock()
    generator = (selection_generator(mcfg.seed, client_id, round_idx)
                 if strategy.needs_generator else None)
    acc = RoundAccumulator()
    picks: Counter[ExpertId] = Counter()
    batches = [idx for idx in _batches(data, train_cfg, mcfg.seed, round_idx)
               if len(idx) == train_cfg.batch_size]  # the program's batch size is static
    if train_cfg.max_steps:
        batches = batches[: train_cfg.max_steps]
    encoded = [collate(data, idx, model.tokenizer, max_length, pad_to_max_length=True)
               for idx in batches]
    with torch.no_grad():
        for batch in encoded:
            with model.capture(batch["attention_mask"]) as cap:
                model.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            stats = compute_batch_stats(cap.scores, cap.routed, mcfg)
            sel = strategy.select(stats, budget, generator=generator, assignment=assignment)
            picks.update(sel.experts & stats.routed)
            acc.add(stats)
    size = bucket_for(budget) if budget else 0
    chosen = sorted(e for e, _ in sorted(picks.items(), key=lambda kv: (-kv[1], kv[0]))[:size])
    losses: list[float] = []
    stopped_by = "data"
    deltas: dict[str, torch.Tensor] = {}
    if chosen and encoded:
        trainer = ExecuTorchTrainer(model, chosen, (train_cfg.batch_size, max_length),
                                    train_cfg.lr, bucket=size, backend=backend)
        step_time = 0.0
        for batch in encoded:
            if deadline_s is not None and losses and clock() - start + step_time > deadline_s:
                stopped_by = "deadline"
                break
            t0 = clock()
            losses.append(trainer.step(batch))
            step_time = clock() - t0
        deltas = trainer.deltas()
        model.load_state({k: model.parameter(k).detach() + d for k, d in deltas.items()})
    stats_round = acc.result() if acc.num_batches else None
    update = SparseUpdate(
        run_id=run_id, round_idx=round_idx, client_id=client_id,
        num_examples=max(len(losses) * train_cfg.batch_size, 1), deltas=deltas,
        usage=dict(stats_round.usage) if stats_round else {},
        importance=dict(stats_round.importance) if stats_round else {},
        routed=stats_round.routed if stats_round else frozenset(),
        updated=frozenset(chosen) if losses else frozenset(), base_model_hash=base_hash,
        meta={"loss": sum(losses) / max(len(losses), 1), "steps": len(losses),
              "stopped_by": stopped_by, "budget": budget, "runtime": "executorch",
              "bucket": size, "seconds": clock() - start})
    return RoundResult(update, len(losses), len(losses) * train_cfg.batch_size,
                       sum(int(b["attention_mask"].sum()) for b in encoded[:len(losses)]),
                       losses, clock() - start, stopped_by, budget,
                       [sorted(map(str, chosen))] * len(losses))
