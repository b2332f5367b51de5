"""The building blocks of a local training step, shared by the device's recipe
(:mod:`device_agent.train`), the export parity checks (:mod:`export.training`) and the
benchmarks: the :class:`Trainer` protocol and its eager PyTorch implementation, the optimizer,
autocast, per-phase step timing and the deltas of what trained.

A trainer trains a fixed expert set plus gates and shared parts; every other expert gets no
gradient and no optimizer state (METHOD.md section 3). The ExecuTorch trainer
(:class:`export.runtime.ExecuTorchTrainer`) follows the same protocol.
"""

from __future__ import annotations

import contextlib
import time
import zlib
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from hfedmoe.config import MethodConfig, TrainConfig
from hfedmoe.importance import compute_batch_stats
from hfedmoe.lora import ExpertFactors, LinearFactors, LoRASpec, split_factor_key
from hfedmoe.models.base import MoEModel
from hfedmoe.models.quantize import quantized_keys
from hfedmoe.names import ExpertId, expert_key, parse_key
from hfedmoe.precision import LowPrecisionFrozen
from hfedmoe.quantize import require_eager, require_lora, weight_mode
from hfedmoe.round_stats import RoundAccumulator

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class StopTraining(Exception):
    """Raised by an ``on_step`` callback to end the round after the current step and send
    what trained (e.g. the device's conditions broke: eligibility ``on_break = "send"``)."""


class PhaseClock:
    """Seconds per phase of a step; on CUDA each lap waits for the device's queued work."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.t = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.t
        self.t = now


def make_optimizer(params: dict[str, torch.Tensor], cfg: TrainConfig
                   ) -> torch.optim.Optimizer:
    """AdamW (default) or SGD over every parameter that may train this round.

    Shared parts (canonical keys ``shared.*``, e.g. a new classification head) get
    ``cfg.head_lr`` when it is set, everything else ``cfg.lr``. Parameters whose ``.grad`` is
    None in a step (frozen experts) are skipped by both: they get no update and no optimizer
    state. The fused kernels are used where torch has them (CPU and CUDA floating-point
    parameters): one pass per tensor instead of the foreach path's temporaries, which on CPU
    made AdamW's step ~7x slower and doubled its transient memory (``benchmarks/kernels.py``).
    """
    plist = list(params.values())
    fused = bool(plist) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                                for p in plist)
    groups: list[dict[str, Any]] = [{"params": plist}]
    if cfg.head_lr:  # (LoRA factors of shared base weights are not a head: cfg.lr)
        head_keys = {k for k in params if k.startswith("shared.") and split_factor_key(k) is None}
        head = [p for k, p in params.items() if k in head_keys]
        rest = [p for k, p in params.items() if k not in head_keys]
        groups = [g for g in ({"params": rest}, {"params": head, "lr": cfg.head_lr})
                  if g["params"]] or [{"params": []}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               fused=fused or None)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay,
                             fused=fused or None)


def autocast_for(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on the device when configured; master weights stay fp32."""
    if cfg.dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[cfg.dtype])


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


class Trainer(Protocol):
    """Trains an expert set (plus gates and shared parts) one batch at a time.

    What a round's loop (:func:`device_agent.train.train_round`) reads besides the losses:

    Attributes:
        device: where its batches go (the routing of a per-batch reselection runs there).
        active: the experts training now.
        trained: the active experts that received a gradient so far (the update's
            ``updated``).
        acc: usage and importance from the training forwards' gate capture; empty where the
            trainer cannot see its gates (the ExecuTorch program), and the round then takes
            them from its routing pass.
        phases: per step, seconds per phase (``forward``/``backward``/``optimizer``) where
            the trainer can time them.
        max_state_experts: the most experts holding optimizer state at any step.
    """

    device: torch.device
    active: frozenset[ExpertId]
    trained: set[ExpertId]
    acc: RoundAccumulator
    phases: list[dict[str, float]]
    max_state_experts: int

    def set_active(self, experts: frozenset[ExpertId]) -> None:
        """Change the active set (``train.reselect = "batch"``)."""

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        """One forward, backward and optimizer step; returns the loss."""

    def deltas(self) -> dict[str, torch.Tensor]:
        """End the round: the deltas of what trained by canonical key (LoRA: the factors);
        the model holds the trained weights (LoRA: its base weights)."""


class EagerTrainer:
    """PyTorch training of ``experts`` + gates + shared parts; nothing else holds state.

    Each training forward captures its gate scores, so the round's usage and importance need
    no extra pass (:attr:`acc`).
    """

    def __init__(self, model: MoEModel, experts: Sequence[ExpertId], train_cfg: TrainConfig,
                 mcfg: MethodConfig, seed: int = 0,
                 low: LowPrecisionFrozen | None = None) -> None:
        self.model, self.cfg, self.mcfg = model, train_cfg, mcfg
        self.device = next(model.module.parameters()).device
        check_quantized(model, train_cfg, "eager")
        # frozen weights stored in the autocast dtype for the round: what trains is put back
        # to fp32 (the optimizer's masters) before anything holds it
        self.low = low
        model.set_trainable(frozenset(experts))
        # LoRA: the selected experts' w_in/w_out and the model's LoRA bases (shared experts,
        # attention targets) stay frozen and carry factors for the round
        self.factors: dict[ExpertId, ExpertFactors] = {}
        self.base_factors: dict[str, LinearFactors] = {}
        if train_cfg.adapter == "lora":
            self._attach_lora(sorted(experts), seed)
        self._restore_trainable()  # (a LoRA expert's base weights stay frozen, and lowered)
        # the starting values of what may train (its experts, gates, shared parts), for the
        # deltas: a copy of the whole model would hold every expert twice
        self.initial = {k: p.detach().clone() for k, p in model.trainable_parameters().items()}
        self.active = frozenset(experts)
        params: dict[str, torch.Tensor] = dict(model.trainable_parameters())
        params.update(self.factor_tensors())
        self.optimizer = make_optimizer(params, train_cfg)
        self.acc = RoundAccumulator()
        self.trained: set[ExpertId] = set()  # active experts that received a gradient
        self.steps = 0
        self.max_state_experts = 0
        self.phases: list[dict[str, float]] = []  # per step: forward/backward/optimizer seconds

    def _attach_lora(self, experts: Sequence[ExpertId], seed: int) -> None:
        """Fresh factors (A drawn from ``seed``: experts in order, then the bases by key) on
        the experts and on the model's LoRA bases, whose weights are frozen for the round."""
        lora = LoRASpec(self.cfg.lora_rank, self.cfg.lora_alpha)
        gen = torch.Generator().manual_seed(seed)
        for e in experts:
            expert = self.model.layer(e.layer_idx).bank.experts[e.expert_idx]
            expert.w_in.requires_grad_(False)
            expert.w_out.requires_grad_(False)
            expert.factors = self.factors[e] = ExpertFactors(expert.w_in, expert.w_out, lora,
                                                             gen)
        for key, linear in sorted(self.model.lora_bases.items()):
            self.model.parameter(key).requires_grad_(False)
            self.base_factors[key] = LinearFactors(linear, lora, gen)

    def factor_tensors(self) -> dict[str, torch.Tensor]:
        """The round's LoRA factors by the keys they travel under."""
        out = {expert_key(e.layer_idx, e.expert_idx, n): t
               for e, f in self.factors.items() for n, t in f.factors.items()}
        out.update({f"{key}.{n}": t for key, f in self.base_factors.items()
                    for n, t in f.factors.items()})
        return out

    def _restore_trainable(self) -> None:
        if self.low is not None:
            self.low.restore(only=self.model.trainable_parameters().values())

    def _tensors(self, e: ExpertId) -> list[torch.Tensor]:
        """What of expert ``e`` may train: its parameters, and its LoRA factors if any."""
        out = list(self.model.expert_parameters(e).values())
        if e in self.factors:
            out += list(self.factors[e].factors.values())
        return out

    def set_active(self, experts: frozenset[ExpertId]) -> None:
        """Change the active set (per-batch mode); experts leaving free their optimizer state."""
        for e in self.active - experts:
            for p in self.model.expert_parameters(e).values():
                self.optimizer.state.pop(p, None)
        new = experts - self.active
        self.active = experts
        self.model.set_trainable(experts)
        self._restore_trainable()
        for k, p in self.model.trainable_parameters().items():
            self.initial.setdefault(k, p.detach().clone())  # before its first step
        known = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        fresh = [p for e in sorted(new) for p in self.model.expert_parameters(e).values()
                 if id(p) not in known]
        if fresh:
            self.optimizer.add_param_group({"params": fresh})  # the defaults: cfg.lr

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        tick = PhaseClock(self.device)
        batch = to_device(batch, self.device)
        mask = batch["attention_mask"]
        with autocast_for(self.cfg, self.device), self.model.capture(mask) as cap:
            loss = self.model.module(**batch).loss
        tick.lap("forward")
        loss.backward()
        tick.lap("backward")
        got_grad = {e for e in self.active if any(p.grad is not None for p in self._tensors(e))}
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        tick.lap("optimizer")
        self.phases.append(tick.laps)
        self.trained |= got_grad
        self.acc.add(compute_batch_stats(cap.scores, cap.routed, self.mcfg), got_grad,
                     expert_rows=cap.expert_rows, batch_rows=mask.numel())
        self.max_state_experts = max(self.max_state_experts, self.state_experts())
        self.steps += 1
        return float(loss.detach())

    def state_experts(self) -> int:
        """Experts whose parameters hold optimizer state now."""
        held = {id(p) for p in self.optimizer.state}
        return sum(1 for e in self.model.expert_ids()
                   if any(id(p) in held for p in self._tensors(e)))

    def deltas(self) -> dict[str, torch.Tensor]:
        """Deltas of what trained; with LoRA, the factors of the trained experts instead of
        their weight deltas (the server expands them, :func:`hfedmoe.lora.expand`). The
        factors are detached from the model, which keeps its base weights."""
        self.model.set_trainable(())
        self.optimizer.state.clear()  # the round is over: free the moments before the deltas
        out = deltas_since(self.model, self.initial, frozenset(self.trained),
                      trained_any=self.steps > 0)
        for e, f in self.factors.items():
            if e in self.trained:
                out.update({expert_key(e.layer_idx, e.expert_idx, n): t.detach().clone()
                            for n, t in f.factors.items()})
            self.model.layer(e.layer_idx).bank.experts[e.expert_idx].factors = None
        for key, lf in self.base_factors.items():
            if self.steps > 0:
                out.update({f"{key}.{n}": t.detach().clone() for n, t in lf.factors.items()})
            lf.remove()
        self.factors, self.base_factors = {}, {}
        return out


def factor_seed(mcfg: MethodConfig, round_idx: int, client_id: str) -> int:
    """Seed of the generator a round's LoRA A factors are drawn from (eager and ExecuTorch
    trainers alike, so both runtimes start a round from the same factors)."""
    return zlib.crc32(f"{mcfg.seed}:{round_idx}:{client_id}".encode())


def check_quantized(model: MoEModel, train_cfg: TrainConfig, runtime: str) -> None:
    """A device whose base is stored quantized (``model.quantize``) trains LoRA factors only,
    on the eager runtime: a round announced with ``train.adapter = "full"`` is refused, naming
    the fix, and so is the ExecuTorch runtime (its programs are exported from fp32 weights)."""
    keys = quantized_keys(model)
    if keys:
        require_lora(weight_mode(model.parameter(keys[0])), train_cfg.adapter)
        require_eager(runtime)


def deltas_since(model: MoEModel, initial: dict[str, torch.Tensor], updated: frozenset[ExpertId],
            trained_any: bool) -> dict[str, torch.Tensor]:
    """trained - initial for the updated experts, and for gates/shared parts if any step ran.

    ``initial`` holds the starting values of every parameter that may have trained."""
    out = {}
    for key, start in initial.items():
        pk = parse_key(key)
        if pk.kind == "expert" and pk.expert not in updated:
            continue
        if pk.kind != "expert" and not trained_any:
            continue
        out[key] = model.parameter(key).detach() - start
    return out
