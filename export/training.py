"""Export a training program to a file and check it against eager PyTorch SGD.

:func:`training_parity` runs ``steps`` SGD steps twice on the same batches: in the ExecuTorch
program (:class:`~export.runtime.ExecuTorchTrainer`) and in eager PyTorch with the same
trainable set (``MoEModel.set_trainable(experts, gates, shared)`` and ``torch.optim.SGD``;
in ``"dropped"`` mode the eager reference is the :class:`~export.programs.TrainingProgram`
module itself, since dropping experts changes the forward). It compares the per-step losses
and the updates of every trained parameter by canonical name.

:func:`lora_training_parity` does the same for the LoRA program
(:class:`~export.programs.LoRATrainingProgram`): the eager reference is the kit's own eager
LoRA, :class:`hfedmoe.trainer.EagerTrainer` with ``train.adapter = "lora"`` and
``optimizer = "sgd"``, from the same factors (the same generator seed); the compared values
are the factors themselves (what both send) and the deltas of biases, gates and head.

Both work for a classifier and for a causal LM (``model.task``): the batches are
:func:`~export.common.example_inputs` of the model's task, for a causal LM token ids with
``-100`` labels on a prompt and on padding, so the compared losses are response-only
next-token losses.

With ``capacity_factor`` the program runs the ``"capacity"`` expert path
(:func:`hfedmoe.experts.capacity_experts`) and so does the eager reference (its banks switched
to the same path and factor), so both drop the same token-expert pairs and parity stays exact;
:attr:`TrainingParity.drops_eager` records the reference's (dropped, routed) pairs per step.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from export.common import ExportReport, example_inputs
from export.executorch import Backend
from export.programs import (
    DropMode,
    TrainingProgram,
    expert_path,
    export_mode,
    flat_expert_index,
)
from export.runtime import ExecuTorchTrainer, ProgramCache
from hfedmoe.config import TrainConfig, resolve_adapter
from hfedmoe.errors import ExportError
from hfedmoe.lora import LoRASpec
from hfedmoe.models.base import MoEModel
from hfedmoe.names import ExpertId

# Losses (relative to max(1, |loss|)) and parameter updates after a few SGD steps (float32):
# kernels differ from CPU to CPU, and a loss of 1.5 after 5 steps at lr 0.5 drifts ~100 ulps.
TRAIN_TOL = 1e-5


@dataclass
class TrainingParity:
    losses_executorch: list[float] = field(default_factory=list)
    losses_eager: list[float] = field(default_factory=list)
    deltas_executorch: dict[str, torch.Tensor] = field(default_factory=dict)
    deltas_eager: dict[str, torch.Tensor] = field(default_factory=dict)
    # (dropped, routed) token-expert pairs of every eager step, summed over the layers
    # ("capacity" path only; empty for the dense path)
    drops_eager: list[tuple[int, int]] = field(default_factory=list)

    @property
    def dropped_fraction(self) -> float:
        """Dropped / routed pairs over the eager steps (0 on the dense path)."""
        routed = sum(r for _, r in self.drops_eager)
        return sum(d for d, _ in self.drops_eager) / routed if routed else 0.0

    @property
    def loss_diff(self) -> float:
        return max(abs(a - b) / max(1.0, abs(b))
                   for a, b in zip(self.losses_executorch, self.losses_eager, strict=True))

    @property
    def param_diff(self) -> float:
        return max((self.deltas_executorch[k] - self.deltas_eager[k]).abs().max().item()
                   for k in self.deltas_executorch)


def _use_capacity(model: MoEModel, capacity_factor: float | None) -> None:
    """Switch ``model``'s banks to the ``"capacity"`` path at ``capacity_factor`` (None: keep
    the model's own path, which computes what ``"dense"`` does)."""
    if capacity_factor is not None:
        expert_path(capacity_factor)  # checks the factor
        model.set_expert_impl("capacity", capacity_factor=capacity_factor)


def _record_drops(model: MoEModel, capacity_factor: float | None,
                  drops: list[tuple[int, int]] | None) -> None:
    if drops is not None and capacity_factor is not None:
        drops.append(model.capacity_drops())


def adapter_for(task: str, lora_rank: int | None, lora_alpha: float) -> LoRASpec | None:
    """A training program's adapter: LoRA of ``lora_rank`` if given (0: full experts, None),
    else what ``train.adapter = "auto"`` picks for ``task`` (LoRA at ``train.lora_rank``'s
    default for a causal LM, full experts for a classifier)."""
    if lora_rank is None:
        auto = resolve_adapter(TrainConfig(), task)
        lora_rank = auto.lora_rank if auto.adapter == "lora" else 0
    return LoRASpec(lora_rank, lora_alpha) if lora_rank else None


def eager_sgd(model: MoEModel, experts: Sequence[ExpertId], batches: Sequence[dict],
              lr: float, mode: DropMode = "frozen", gates: bool = True,
              shared: bool = True, capacity_factor: float | None = None,
              drops: list[tuple[int, int]] | None = None
              ) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Plain PyTorch SGD on a copy of ``model``: per-step losses and canonical deltas.

    ``capacity_factor``: the copy's experts run the ``"capacity"`` path at this factor, as the
    program of that factor does; ``drops`` (if given) then gets every step's
    ``(dropped, routed)`` pairs (:meth:`MoEModel.capacity_drops`).
    """
    ref = copy.deepcopy(model)
    _use_capacity(ref, capacity_factor)
    before = ref.state()
    losses = []
    if mode == "frozen":
        ref.set_trainable(experts, gates=gates, shared=shared)
        params = list(ref.trainable_parameters().values())
        opt = torch.optim.SGD(params, lr=lr)
        for b in batches:
            opt.zero_grad()
            loss = ref.module(**b).loss
            _record_drops(ref, capacity_factor, drops)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, {k: p.detach() - before[k] for k, p in ref.trainable_parameters().items()}
    with export_mode(ref, attn="eager", capacity_factor=capacity_factor):
        prog = TrainingProgram(ref, len(experts), mode, gates, shared, capacity_factor)
        prog.load_slots(experts)
        idx = flat_expert_index(ref, experts, len(experts))
        start = {n: prog.slot(n).detach().clone() for n in prog.param_names}
        opt = torch.optim.SGD([p for p in prog.parameters() if p.requires_grad], lr=lr)
        for b in batches:
            opt.zero_grad()
            loss, _ = prog(b["input_ids"], b["attention_mask"], b["labels"], idx)
            _record_drops(ref, capacity_factor, drops)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        slots_now = {n: prog.slot(n).detach() for n in prog.param_names}
        deltas = {k: v - prog.slot_state(experts, start)[k]
                  for k, v in prog.slot_state(experts, slots_now).items()}
        deltas.update({k: p.detach() - before[k] for k, p in ref.trainable_parameters().items()
                       if "experts" not in k})
    return losses, deltas


def training_parity(model: MoEModel, experts: Sequence[ExpertId], batch: int, seq: int,
                    steps: int = 5, lr: float = 0.1, mode: DropMode = "frozen",
                    backend: Backend = "portable", cache: ProgramCache | None = None,
                    capacity_factor: float | None = None
                    ) -> tuple[ExecuTorchTrainer, TrainingParity]:
    """``steps`` SGD steps in ExecuTorch and in eager PyTorch on the same batches (both on the
    ``"capacity"`` expert path at ``capacity_factor`` when given)."""
    batches = [example_inputs(model, batch, seq, seed=10 + i) for i in range(steps)]
    trainer = ExecuTorchTrainer(model, experts, (batch, seq), lr, mode=mode, backend=backend,
                                cache=cache, capacity_factor=capacity_factor)
    result = TrainingParity()
    result.losses_executorch = [trainer.step(b) for b in batches]
    result.deltas_executorch = trainer.deltas()
    result.losses_eager, result.deltas_eager = eager_sgd(
        model, experts, batches, lr, mode, capacity_factor=capacity_factor,
        drops=result.drops_eager)
    return trainer, result


def eager_lora_sgd(model: MoEModel, experts: Sequence[ExpertId], batches: Sequence[dict],
                   lr: float, lora: LoRASpec, seed: int = 0,
                   capacity_factor: float | None = None,
                   drops: list[tuple[int, int]] | None = None
                   ) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The kit's eager LoRA (``EagerTrainer``, ``adapter="lora"``, plain SGD at one ``lr``)
    on a copy of ``model``: per-step losses and what it sends (factors + dense deltas).
    ``capacity_factor`` and ``drops`` as in :func:`eager_sgd`."""
    from hfedmoe.config import MethodConfig, TrainConfig
    from hfedmoe.trainer import EagerTrainer

    ref = copy.deepcopy(model)
    _use_capacity(ref, capacity_factor)
    cfg = TrainConfig(lr=lr, head_lr=0.0, optimizer="sgd", weight_decay=0.0, adapter="lora",
                      lora_rank=lora.rank, lora_alpha=lora.alpha)
    trainer = EagerTrainer(ref, experts, cfg, MethodConfig(), seed=seed)
    losses = []
    for b in batches:
        losses.append(trainer.step(b))
        _record_drops(ref, capacity_factor, drops)
    return losses, trainer.deltas()


def lora_training_parity(model: MoEModel, experts: Sequence[ExpertId], batch: int, seq: int,
                         lora: LoRASpec, steps: int = 5, lr: float = 0.1, seed: int = 0,
                         backend: Backend = "portable", cache: ProgramCache | None = None,
                         capacity_factor: float | None = None
                         ) -> tuple[ExecuTorchTrainer, TrainingParity]:
    """``steps`` SGD steps in the LoRA ExecuTorch program and in the kit's eager LoRA on the
    same batches, both from the factors drawn with ``seed`` (both on the ``"capacity"``
    expert path at ``capacity_factor`` when given)."""
    batches = [example_inputs(model, batch, seq, seed=10 + i) for i in range(steps)]
    trainer = ExecuTorchTrainer(model, experts, (batch, seq), lr, backend=backend, cache=cache,
                                lora=lora, seed=seed, capacity_factor=capacity_factor)
    result = TrainingParity()
    result.losses_executorch = [trainer.step(b) for b in batches]
    result.deltas_executorch = trainer.deltas()
    result.losses_eager, result.deltas_eager = eager_lora_sgd(
        model, experts, batches, lr, lora, seed, capacity_factor=capacity_factor,
        drops=result.drops_eager)
    return trainer, result


def export_training_pte(model: MoEModel, experts: Sequence[ExpertId], batch: int, seq: int,
                        out_dir: str | Path, mode: DropMode = "frozen",
                        backend: Backend = "portable", steps: int = 5,
                        lr: float = 0.1, lora: LoRASpec | None = None,
                        capacity_factor: float | None = None) -> ExportReport:
    """Export the training program of the bucket holding ``experts`` into ``out_dir``
    (``<key>.pte`` + ``<key>.json``) and check ``steps`` SGD steps against eager (with
    ``lora``: the LoRA program against the kit's eager LoRA; with ``capacity_factor``: both
    on the ``"capacity"`` expert path)."""
    cache = ProgramCache(out_dir)
    if lora is None:
        trainer, parity = training_parity(model, experts, batch, seq, steps, lr, mode, backend,
                                          cache, capacity_factor)
    else:
        if mode != "frozen":
            raise ExportError(f"LoRA training programs keep the other experts frozen, not "
                              f"{mode!r}")
        trainer, parity = lora_training_parity(model, experts, batch, seq, lora, steps, lr,
                                               backend=backend, cache=cache,
                                               capacity_factor=capacity_factor)
    prog = trainer.program
    extra = set(parity.deltas_executorch) ^ set(parity.deltas_eager)
    report = ExportReport(
        "train-pte", str(Path(out_dir) / f"{prog.key}.pte"), len(prog.buffer),
        prog.trainable_params, tolerance=TRAIN_TOL,
        parity={"losses": parity.loss_diff, "updates": parity.param_diff,
                "key sets": float(len(extra))},
        info={"bucket": prog.bucket, "experts": ",".join(map(str, experts)),
              "mode": mode, "backend": backend, "shape": f"{batch}x{seq}",
              "adapter": f"lora r={lora.rank} alpha={lora.alpha}" if lora else "full",
              "experts path": ("dense" if capacity_factor is None else
                               f"capacity {capacity_factor:g} (eager dropped "
                               f"{100 * parity.dropped_fraction:.1f}% of routed pairs)"),
              "export_s": round(prog.export_s, 2), "sgd steps": f"{steps} (lr {lr})",
              "losses (et)": " ".join(f"{v:.5f}" for v in parity.losses_executorch),
              "losses (eager)": " ".join(f"{v:.5f}" for v in parity.losses_eager)})
    return report
